"""Memory of K-means and GBC does not grow with N beyond the data and the output.

Each size runs in a fresh process (``benchmarks.scaling_worker``), which reports the resident-set
high-water mark of the first call (compilation included) above what was resident before it.
Subtracting the call's own output, what is left must not grow with N: the work is chunked.
"""

import pytest

from benchmarks.scaling import worker

MiB = 1 << 20


def extra_beyond_output(what, n, **flags):
    argv = ["--what", what, "--n", str(n), "--repeats", "1"]
    for key, value in flags.items():
        argv += [f"--{key.replace('_', '-')}", str(value)]
    row = worker(argv)
    assert "error" not in row, row.get("error")
    if not row["hwm_reset"]:
        pytest.skip("this kernel cannot reset the resident-set high-water mark")
    return row["first_call_extra_bytes"] - row["output_bytes"]


# The high-water mark of one call scatters by about +-20 MiB from run to run (allocator arenas
# of XLA's threads), whatever N is; the sizes are chosen so that an N-sized temporary would
# stand far above that: a copy of G grows by 137 MiB from 20k to 160k rows (dim 256), GBC's
# output by 330 MiB from 20k to 80k.
@pytest.mark.parametrize("what, flags, large_n", [
    pytest.param("gbc", {"chunk": 1024}, 80_000, marks=pytest.mark.slow),
    pytest.param("kmeans", {"dim": 256, "clusters": 16, "iters": 5, "block_size": 2048}, 160_000,
                 marks=pytest.mark.slow),
])
def test_memory_flat_in_n(what, flags, large_n):
    small = extra_beyond_output(what, 20_000, **flags)
    large = extra_beyond_output(what, large_n, **flags)
    assert large - small < 64 * MiB, (small / MiB, large / MiB)
