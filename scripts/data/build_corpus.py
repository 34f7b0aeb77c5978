"""Rebuild the bundled corpus in ``data/corpus/`` from Debian's R data packages.

The six Jane Austen novels come from ``r-cran-janeaustenr`` and Moby-Dick from
``r-cran-tokenizers``; both packages ship Project Gutenberg texts as R lazy-load data.
This script downloads the two ``.deb`` files with ``apt-get download``, reads the R data
with the ``rdata`` package (``pip install rdata``), strips the Project Gutenberg header and
footer, splits every book into chapters and writes one jsonl file per book, one chapter a
line: ``{"text", "title", "author", "chapter"}``.

    python scripts/data/build_corpus.py --out data/corpus
"""

import argparse
import json
import re
import subprocess
import tempfile
import zlib
from pathlib import Path

# (R object, deb package, slug, title, author)
BOOKS = [
    ("sensesensibility", "r-cran-janeaustenr", "austen_sense_and_sensibility", "Sense and Sensibility", "Jane Austen"),
    ("prideprejudice", "r-cran-janeaustenr", "austen_pride_and_prejudice", "Pride and Prejudice", "Jane Austen"),
    ("mansfieldpark", "r-cran-janeaustenr", "austen_mansfield_park", "Mansfield Park", "Jane Austen"),
    ("emma", "r-cran-janeaustenr", "austen_emma", "Emma", "Jane Austen"),
    ("northangerabbey", "r-cran-janeaustenr", "austen_northanger_abbey", "Northanger Abbey", "Jane Austen"),
    ("persuasion", "r-cran-janeaustenr", "austen_persuasion", "Persuasion", "Jane Austen"),
    ("mobydick", "r-cran-tokenizers", "melville_moby_dick", "Moby-Dick; or, The Whale", "Herman Melville"),
]
R_LIBRARY = {"r-cran-janeaustenr": "janeaustenr", "r-cran-tokenizers": "tokenizers"}

CHAPTER = re.compile(r"^(CHAPTER|Chapter) [0-9IVXLC]+\b|^Epilogue$")
VOLUME = re.compile(r"^VOLUME [IVX]+$")


def read_r_lazyload(base):
    """Read every object of an R lazy-load database (``base.rdx`` index + ``base.rdb``)."""
    import rdata

    index = rdata.conversion.convert(rdata.parser.parse_file(f"{base}.rdx"))
    blob = Path(f"{base}.rdb").read_bytes()
    objects = {}
    for name, (offset, length) in index["variables"].items():
        # Each record is a 4-byte big-endian length followed by a zlib stream.
        record = blob[int(offset) : int(offset) + int(length)]
        parsed = rdata.parser.parse_data(zlib.decompress(record[4:]))
        objects[name] = rdata.conversion.convert(parsed)
    return objects


def strip_gutenberg(text):
    """Keep what lies between the Project Gutenberg START and END lines, if they are there."""
    start = re.search(r"^\*\*\* ?START OF TH(IS|E) PROJECT GUTENBERG.*$", text, re.M)
    end = re.search(r"^\*\*\* ?END OF TH(IS|E) PROJECT GUTENBERG.*$", text, re.M)
    if start and end:
        text = text[start.end() : end.start()]
    text = re.sub(r"^End of (the )?Project Gutenberg.*$", "", text, flags=re.M)
    text = re.sub(r"^Produced by .*$", "", text, flags=re.M)
    # The transcriber's note is about the etext, not part of the book.
    return re.sub(r"Original Transcriber's Notes:.*?(?=^ETYMOLOGY\.)", "", text, flags=re.S | re.M)


def split_chapters(text):
    """Split a book at its chapter headings; front matter and a VOLUME line join the next chapter."""
    lines = text.split("\n")
    starts = [i for i, line in enumerate(lines) if CHAPTER.match(line)]
    for k, i in enumerate(starts):
        j = i - 1
        while j > 0 and not lines[j].strip():
            j -= 1
        if VOLUME.match(lines[j]):
            starts[k] = j
    starts[0] = 0
    pieces = [lines[a:b] for a, b in zip(starts, starts[1:] + [len(lines)])]
    return [re.sub(r"\n{4,}", "\n\n\n", "\n".join(p)).strip("\n") + "\n" for p in pieces]


def main(out):
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        packages = sorted({deb for _, deb, *_ in BOOKS})
        subprocess.run(["apt-get", "download", *packages], cwd=tmp, check=True)
        objects = {}
        for deb in Path(tmp).glob("*.deb"):
            subprocess.run(["dpkg-deb", "-x", str(deb), f"{tmp}/root"], check=True)
        for package, library in R_LIBRARY.items():
            objects.update(read_r_lazyload(f"{tmp}/root/usr/lib/R/site-library/{library}/data/Rdata"))
    for name, _, slug, title, author in BOOKS:
        text = "\n".join(str(line) for line in objects[name])
        text = text.lstrip("\ufeff").replace("\r\n", "\n")
        chapters = split_chapters(strip_gutenberg(text))
        with open(out / f"{slug}.jsonl", "w", encoding="utf-8") as f:
            for i, chapter in enumerate(chapters):
                row = {"text": chapter, "title": title, "author": author, "chapter": i}
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
        print(f"{slug}: {len(chapters)} chapters, {sum(map(len, chapters)):,} characters")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="data/corpus")
    main(parser.parse_args().out)
