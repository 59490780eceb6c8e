"""Memory of K-means and GBC does not grow with N beyond the data and the output.

Each size runs in a fresh process (``benchmarks.scaling_worker``), which reports the resident-set
high-water mark of the first call (compilation included) above what was resident before it.
Subtracting the call's own output, what is left must not grow with N: the work is chunked.
"""

import pytest

from benchmarks import run as bench

MiB = 1 << 20


def extra_beyond_output(what, n, **flags):
    argv = ["--what", what, "--n", str(n), "--repeats", "1"]
    for key, value in flags.items():
        argv += [f"--{key.replace('_', '-')}", str(value)]
    row = bench._worker(argv)
    assert "error" not in row, row.get("error")
    if not row["hwm_reset"]:
        pytest.skip("this kernel cannot reset the resident-set high-water mark")
    return row["first_call_extra_bytes"] - row["output_bytes"]


@pytest.mark.parametrize("what, flags", [
    ("gbc", {"chunk": 1024}),
    ("kmeans", {"dim": 256, "clusters": 16, "iters": 5, "block_size": 2048}),
])
def test_memory_flat_in_n(what, flags):
    small = extra_beyond_output(what, 20_000, **flags)
    large = extra_beyond_output(what, 80_000, **flags)
    # 4x the rows: an N-sized temporary would add at least tens of MiB here
    # (a copy of G grows by 59 MiB, GBC's output by 330 MiB); allow 32 MiB of allocator noise.
    assert large - small < 32 * MiB, (small / MiB, large / MiB)
