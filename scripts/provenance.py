"""Where a measurement comes from: the machine and library versions it ran on and the code it
ran, as one block with the same keys in every benchmark's and evaluation's JSON report, stored
under the key ``"environment"``.

    from provenance import add_commit_argument, describe, environment

    env = environment("cuda", commit=args.commit)
    json.dump({"environment": env, "rows": rows}, f)
    header = f"Attention TFLOP/s, {describe(env, 'triton')}"

The block (a package that is not installed is None):

    gpu             the CUDA device's name, or "CPU (<processor>)" for a run on the CPU
    gpu_memory_gib  the device's total memory in GiB (None on the CPU)
    python          the interpreter's version
    torch, cuda, cudnn, triton, transformers, accelerate, liger_kernel
                    versions (cuda and cudnn as torch was built with them)
    git_commit      the full hash of HEAD in the checkout that holds this script, or the
                    ``--commit`` a run was given (a copy of the tree without .git)
    git_dirty       True when tracked files outside results/ differ from that commit (the
                    code that ran is not the commit alone: headers then say "modified"),
                    False when they do not, None where git cannot tell (no checkout, or
                    ``--commit`` given); results/ is left out, since the run itself writes there
    date            the day of the run, YYYY-MM-DD
    argv            the script's command-line arguments

Scripts are run, not imported: each one puts ``scripts/`` on ``sys.path`` to import this file.
"""

import datetime
import json
import platform
import re
import subprocess
import sys
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
# Distribution name -> key in the block.
PACKAGES = {"triton": "triton", "transformers": "transformers", "accelerate": "accelerate",
            "liger-kernel": "liger_kernel"}


def _version(dist):
    try:
        return version(dist)
    except PackageNotFoundError:
        return None


def _git(repo, *args):
    """git's output in ``repo``, or None where git or the checkout is missing."""
    try:
        return subprocess.check_output(["git", "-C", str(repo), *args], text=True, stderr=subprocess.DEVNULL)
    except (OSError, subprocess.CalledProcessError):
        return None


def git_commit(repo=REPO):
    """The full hash of HEAD in the checkout ``repo``, or None outside a git checkout."""
    out = _git(repo, "rev-parse", "HEAD")
    return None if out is None else out.strip()


def git_dirty(repo=REPO):
    """Whether tracked files in ``repo`` outside ``results/`` differ from HEAD (untracked files
    do not count; a report written there earlier in the same run does not either), or None
    outside a git checkout."""
    out = _git(repo, "status", "--porcelain", "--untracked-files=no", "--", ".", ":(exclude)results")
    return None if out is None else bool(out.strip())


def environment(device="cuda", commit=None):
    """The provenance block (keys in the module docstring) of a run on ``device``.

    Args:
        device: the torch device (or its name) the measurement runs on.
        commit: the commit to record instead of asking git (for a checkout without .git).
    """
    device = torch.device(device)
    on_gpu = device.type == "cuda"
    return {
        "gpu": torch.cuda.get_device_name(device) if on_gpu
        else f"CPU ({platform.processor() or platform.machine()})",
        "gpu_memory_gib": torch.cuda.get_device_properties(device).total_memory / 2**30 if on_gpu else None,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        **{key: _version(dist) for dist, key in PACKAGES.items()},
        "git_commit": commit or git_commit(),
        "git_dirty": None if commit else git_dirty(),
        "date": datetime.date.today().isoformat(),
        "argv": sys.argv[1:],
    }


def short_commit(env):
    """The commit for a table header: a hash cut to 10 characters; any other text (a merged
    table's note of which rows come from which commit) as written; ", modified" after it when
    the run's tracked files differed from the commit."""
    commit = str(env["git_commit"])
    commit = commit[:10] if re.fullmatch(r"[0-9a-f]+", commit) else commit
    return f"{commit}, modified" if env.get("git_dirty") else commit


def describe(env, *packages):
    """"<gpu>, <date> (torch <v>, <package> <v>..., commit <hash>)" for a results header;
    ``packages`` are keys of the block (``"triton"``, ``"liger_kernel"``...)."""
    versions = [f"torch {env['torch']}"] + [f"{p.replace('_', '-')} {env.get(p)}" for p in packages]
    return f"{env['gpu']}, {env['date']} ({', '.join(versions)}, commit {short_commit(env)})"


def add_commit_argument(parser):
    """``--commit``: what ``environment`` records when the checkout has no .git."""
    parser.add_argument("--commit", help="git commit to record when the checkout has no .git")


def write_report(folder, stem, report, table):
    """Write ``report`` (with its ``"environment"`` block) as ``<folder>/<stem>.json`` and the
    readable ``table`` as ``<folder>/<stem>.md``; returns the folder."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{stem}.json").write_text(json.dumps(report, indent=1))
    (folder / f"{stem}.md").write_text(table)
    return folder
