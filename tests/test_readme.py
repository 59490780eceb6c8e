"""The README's Python snippets run as written (executed in order, sharing one namespace)."""

import pathlib
import re

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def python_blocks(text: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


def test_readme_python_snippets_run():
    blocks = python_blocks(README.read_text())
    assert len(blocks) >= 2, "the README should show the Linen and NNX usage"
    namespace: dict = {}
    for block in blocks:
        exec(compile(block, str(README), "exec"), namespace)
    # The Linen example trained direct weights; the NNX one took an L2RW step.
    weights = namespace["weights"]
    assert weights.shape == (256,)
    clean = namespace["noisy"] == namespace["y"]
    # Meta re-weighting learned to down-weight the flipped labels (measured: 0.82 vs 0.18).
    assert float(weights[clean].mean()) > float(weights[~clean].mean()) + 0.3
    assert bool(namespace["metrics"]["finite"])
    for name in ("picked", "picked_gbc"):
        picked = set(map(int, namespace[name]))
        assert 0 < len(picked) <= 8 and not picked & set(range(4))
    assert namespace["G_hist"].shape == (256, 2 * 3 * 32)
    assert namespace["result"].centroids.shape == (8, 2 * 3 * 32)
