"""GPU timing for the benchmark scripts: the median of CUDA-event times after a warm-up call."""

import torch


def cuda_median_ms(fn, repeats=5):
    """Median milliseconds of ``fn()`` on the current CUDA stream over ``repeats`` timed calls,
    after one untimed call (compilation, autotuning)."""
    fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]
