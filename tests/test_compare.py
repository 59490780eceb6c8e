"""experiments.compare: the check behind "results unchanged" claims."""

import json

import pytest

from experiments import compare


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


ROW = {"method": "rbc", "seed": 0, "config_id": "abc", "test_accuracy": 0.9,
       "meta_indices": [1, 2], "train_seconds": 3.0}


@pytest.mark.parametrize("change, code, says", [
    ({}, 0, "1 rows compared, 0 differing fields"),
    ({"train_seconds": 9.0, "phase_seconds": {"x": 1}}, 0, "0 differing"),  # timings ignored
    ({"test_accuracy": 0.8}, 1, "test_accuracy: 0.9 -> 0.8"),
    ({"meta_indices": [1, 3]}, 1, "meta_indices"),
    ({"feature_mode": "in_memory"}, 1, "fields only in new: feature_mode"),
    ({"seed": 1}, 1, "only in old"),
])
def test_compare_table(tmp_path, capsys, change, code, says):
    old = _write(tmp_path / "a.jsonl", [ROW])
    new = _write(tmp_path / "b.jsonl", [{**ROW, **change}])
    assert compare.main([old, new]) == code
    assert says in capsys.readouterr().out


def test_new_fields_allowed_and_missing_field_counts(tmp_path, capsys):
    old = _write(tmp_path / "a.jsonl", [ROW])
    new = _write(tmp_path / "b.jsonl", [{**ROW, "feature_mode": "sketch"}])
    assert compare.main([old, new, "--allow-new-fields"]) == 0
    dropped = {k: v for k, v in ROW.items() if k != "meta_indices"}
    assert compare.main([old, _write(tmp_path / "c.jsonl", [dropped])]) == 1
    assert "meta_indices: [1, 2] -> None" in capsys.readouterr().out


def test_bad_input_is_one_line(tmp_path, capsys):
    old = _write(tmp_path / "a.jsonl", [ROW])
    assert compare.main([old, str(tmp_path / "missing.jsonl")]) == 2
    assert capsys.readouterr().err.strip().startswith("error: ")
    (tmp_path / "bad.jsonl").write_text("[1, 2]\n")
    assert compare.main([old, str(tmp_path / "bad.jsonl")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "bad.jsonl:1" in err and "\n" not in err
