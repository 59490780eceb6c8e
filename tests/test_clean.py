"""pivotal-clean end to end (issue 16): a person played from the ground truth.

The data are scikit-learn's digits with 40 % uniform label noise (seed 0), written as an
.npz and as an image folder; the person's answers are the work folder's own
``round-K/to_label.csv`` with the ``label`` column filled in from the ground truth, the way
a person would. The default part runs the .npz workflow once (start, ``--rounds 2``,
finish) with a small MLP and checks the files, their columns, the suspects' precision in
the top 10 % and resuming; every refused call is checked against a hash of every file of
the work folder. The slow part runs the image folder with ``--model auto`` (LeNet-5 at
28x28) and kills a ``next`` mid-training.
"""

import csv
import functools
import hashlib
import importlib.metadata
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image
from sklearn.datasets import load_digits

from experiments import clean, clean_plots, clean_report, cleaning, noise
from experiments.userdata import read_user_data

NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
RATE, SEED, TEST_COUNT = 0.4, 0, 300
# Small and quick: an MLP on the 8x8 digits, few epochs (the default suite's budget).
FAST = ["--model", "mlp", "--epochs", "5", "--budget", "60", "--warmup", "20", "--rounds",
        "2", "--batch-size", "128"]


@functools.lru_cache(maxsize=1)
def digits():
    """(train images uint8 (N, 8, 8), noisy labels, true labels, test images, test labels)."""
    data = load_digits()
    order = np.random.default_rng(SEED).permutation(len(data.target))
    test, train = order[:TEST_COUNT], order[TEST_COUNT:]
    images = np.round(data.images * 255 / 16).astype(np.uint8)
    truth = data.target[train].astype(np.int64)
    noisy = noise.uniform(truth, RATE, 10, seed=SEED).labels
    return images[train], np.asarray(noisy), truth, images[test], data.target[test]


def write_npz(path, images, labels):
    np.savez(path, x=images, y=np.asarray([NAMES[k] for k in labels]),
             ids=np.asarray([f"d{i:04d}" for i in range(len(labels))]))
    return str(path)


def write_folder(root, images, labels):
    for i, (image, k) in enumerate(zip(images, labels)):
        os.makedirs(root / NAMES[k], exist_ok=True)
        Image.fromarray(image).save(root / NAMES[k] / f"d{i:04d}.png")
    return str(root)


def truth_of(ident: str) -> int:
    """The true digit of an example id (``d0012`` or ``seven/d0012.png``)."""
    return int(digits()[2][int(ident.split("/")[-1][1:5])])


def answer(work, r, out, *, edit=None):
    """round-r/to_label.csv with 'label' filled from the ground truth, as a person saves it."""
    with open(os.path.join(work, f"round-{r}", "to_label.csv"), newline="") as f:
        reader = csv.DictReader(f)
        header, rows = reader.fieldnames, list(reader)
    for row in rows:
        row["label"] = NAMES[truth_of(row["id"])]
    if edit is not None:
        rows = edit(rows)
    with open(out, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=header)
        writer.writeheader()
        writer.writerows(rows)
    return str(out)


def tree_hash(folder) -> str:
    """One digest of every file (path and bytes) and folder under ``folder``."""
    total = hashlib.sha256()
    for root, dirs, files in sorted(os.walk(folder)):
        dirs.sort()
        total.update(os.path.relpath(root, folder).encode() + b"/\0")
        for name in sorted(files):
            path = os.path.join(root, name)
            with open(path, "rb") as f:
                digest = hashlib.sha256(f.read()).hexdigest()
            total.update(f"{os.path.relpath(path, folder)}\0{digest}\0".encode())
    return total.hexdigest()


def cli(*argv) -> int:
    return clean.main([str(a) for a in argv])


def read_csv(path) -> tuple:
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        return reader.fieldnames, list(reader)


def precision_at_top(suspects_csv, fraction=0.1) -> float:
    _, rows = read_csv(suspects_csv)
    top = rows[:max(1, round(fraction * len(rows)))]
    return float(np.mean([NAMES[truth_of(r["id"])] != r["given_label"] for r in top]))


# ----------------------------------------------------------------------------- the workflow


@pytest.fixture(scope="module")
def npz_run(tmp_path_factory):
    """The whole .npz workflow, with a copy of the work folder after every step."""
    base = tmp_path_factory.mktemp("npz")
    train_x, noisy, _, test_x, test_y = digits()
    data = write_npz(base / "train.npz", train_x, noisy)
    test = write_npz(base / "test.npz", test_x, test_y)
    work = base / "work"
    stages = {}
    assert cli("start", "--data", data, "--work", work, "--test", test, *FAST) == 0
    stages["start"] = shutil.copytree(work, base / "after-start")
    for r in (0, 1):
        assert cli("next", "--work", work, "--labels", answer(work, r, base / f"a{r}.csv")) == 0
        stages[f"next{r}"] = shutil.copytree(work, base / f"after-next{r}")
    assert cli("finish", "--work", work, "--labels", answer(work, 2, base / "a2.csv")) == 0
    return {"base": base, "work": str(work), "data": data, "test": test, **stages}


def test_round_files_have_the_contract_columns(npz_run):
    state = json.loads((npz_run["base"] / "work" / "state.json").read_text())
    assert state["per_round"] == [20, 20] and state["model"] == "mlp"
    requested = [set(q) for q in state["requested"]]
    assert [len(q) for q in requested] == [20, 20, 20]
    assert not (requested[0] & requested[1]) and not (requested[2] & (requested[0] | requested[1]))
    header0, rows0 = read_csv(os.path.join(npz_run["work"], "round-0", "to_label.csv"))
    assert header0[:2] == ["id", "given_label"] and "label" in header0 and "path" not in header0
    assert all(r["label"] == "" for r in rows0)
    header1, rows1 = read_csv(os.path.join(npz_run["work"], "round-1", "to_label.csv"))
    assert "predicted_label" in header1 and all(r["predicted_label"] in NAMES for r in rows1)
    noisy = digits()[1]
    assert all(r["given_label"] == NAMES[noisy[int(r["id"][1:])]] for r in rows0 + rows1)
    # grey 8x8 arrays are images: a contact sheet to label from
    assert Image.open(os.path.join(npz_run["work"], "round-1", "to_label.png")).width >= 128
    assert state["finished"] and len(state["labels"]) == 3


def test_finish_writes_weights_suspects_report_and_model(npz_run):
    work = npz_run["work"]
    header, rows = read_csv(os.path.join(work, "weights.csv"))
    assert header[:4] == ["id", "weight", "given_label", "predicted_label"]
    state = json.loads(open(os.path.join(work, "state.json")).read())
    labelled = {f"d{i:04d}" for q in state["requested"] for i in q}
    assert len(rows) == len(digits()[1]) - 60 and not labelled & {r["id"] for r in rows}
    weights = np.array([float(r["weight"]) for r in rows])
    assert np.all((weights >= 0) & (weights <= 1)) and weights.std() > 0
    s_header, suspects = read_csv(os.path.join(work, "suspects.csv"))
    assert s_header[:5] == ["rank", "id", "weight", "given_label", "predicted_label"]
    assert sorted(r["id"] for r in suspects) == sorted(r["id"] for r in rows)
    disagree = [r["given_label"] != r["predicted_label"] for r in suspects]
    assert disagree == sorted(disagree, reverse=True)  # disagreeing ones first
    report = open(os.path.join(work, "report.md")).read()
    for name in ("weights_by_agreement.png", "weight_vs_loss.png", "suspects.png"):
        assert f"]({name})" in report
        assert Image.open(os.path.join(work, name)).size[0] > 100
    assert "How suspects are ranked" in report and "Test accuracy (final model):" in report
    predict, meta = cleaning.load_model(work)
    test = read_user_data(npz_run["test"], class_names=meta["class_names"])
    test_x = (test.x * test.std + test.mean - np.asarray(meta["mean"])) / np.asarray(meta["std"])
    accuracy = np.mean(np.argmax(predict(test_x), -1) == test.y)
    assert accuracy == pytest.approx(state["summary"]["test_accuracy"], abs=1e-6)
    assert accuracy > 0.8


def test_suspects_precision_in_the_top_ten_percent(npz_run):
    precision = precision_at_top(os.path.join(npz_run["work"], "suspects.csv"))
    print(f"suspects' precision in the top 10 %: {precision:.3f}")
    assert precision >= 0.7


def test_a_rerun_next_after_a_kill_resumes_to_the_same_selection(npz_run, tmp_path):
    # Killed after training, before state.json was replaced: the state of the start, the
    # checkpoints of the finished training. The rerun resumes them and selects the same.
    work = shutil.copytree(npz_run["start"], tmp_path / "work")
    shutil.copytree(os.path.join(npz_run["next0"], "train"), work / "train")
    trained = tree_hash(work / "train")
    assert cli("next", "--work", work, "--labels", answer(work, 0, tmp_path / "a0.csv")) == 0
    assert tree_hash(work / "train") == trained  # no epoch trained (or saved) again
    want = open(os.path.join(npz_run["next0"], "round-1", "to_label.csv")).read()
    assert open(work / "round-1" / "to_label.csv").read() == want


def test_the_person_never_supplies_ground_truth_for_the_rest(npz_run):
    state = cleaning.load_state(npz_run["work"])
    sets = cleaning._read_sets(state)
    meta = np.concatenate([np.asarray(q) for q in state["requested"]])
    answers = np.concatenate([np.asarray(a) for a in state["labels"]])
    problem = cleaning.user_problem(sets, meta, answers)
    known = np.zeros(len(problem.y_clean), bool)
    known[meta] = True
    assert np.all(problem.y_clean[~known] == cleaning.UNKNOWN)
    assert not problem.y_clean.flags.writeable
    np.testing.assert_array_equal(problem.y_clean[meta], answers)


# ----------------------------------------------------------------------------- refusals


def _drop_first(rows):
    return rows[1:]


def _repeat_first(rows):
    return rows + rows[:1]


def _foreign_id(rows):
    return rows + [{**rows[0], "id": "d9999"}]


def _not_asked(rows):
    return rows + [{**rows[0], "id": "d1400"}]


def _empty_label(rows):
    return [{**rows[0], "label": ""}] + rows[1:]


def _no_class(rows):
    return [{**rows[0], "label": "eleven"}] + rows[1:]


BAD_LABELS = [  # (edit of a correct labels file, words of the one-line error)
    (_drop_first, "no label for 1 of the 20"),
    (_repeat_first, "repeats line"),
    (_foreign_id, "'d9999' was not asked for (it is not in"),
    (_not_asked, "was not asked for in this round"),
    (_empty_label, "has no label"),
    (_no_class, "label 'eleven' is not a class"),
]


def refused(capsys, work, *argv, words) -> None:
    """The call exits 2 with one 'error:' line holding ``words`` and changes nothing."""
    before = tree_hash(work) if os.path.exists(work) else None
    capsys.readouterr()
    assert cli(*argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and words in err, err
    assert (tree_hash(work) if os.path.exists(work) else None) == before


@pytest.mark.parametrize("edit, words", BAD_LABELS, ids=[e.__name__ for e, _ in BAD_LABELS])
def test_a_bad_labels_file_is_refused_and_changes_nothing(npz_run, tmp_path, capsys, edit,
                                                          words):
    work = shutil.copytree(npz_run["start"], tmp_path / "work")
    labels = answer(work, 0, tmp_path / "bad.csv", edit=edit)
    if edit is _not_asked:
        state = json.loads((work / "state.json").read_text())
        assert 1400 not in state["requested"][0]
    refused(capsys, work, "next", "--work", work, "--labels", labels, words=words)


def test_data_changed_since_start_is_refused(npz_run, tmp_path, capsys):
    train_x, noisy, _, _, _ = digits()
    data = write_npz(tmp_path / "train.npz", train_x, noisy)
    work = tmp_path / "work"
    assert cli("start", "--data", data, "--work", work, *FAST) == 0
    labels = answer(work, 0, tmp_path / "a0.csv")
    flipped = noisy.copy()
    flipped[0] = (flipped[0] + 1) % 10
    write_npz(data, train_x, flipped)
    refused(capsys, work, "next", "--work", work, "--labels", labels,
            words="changed since 'pivotal-clean start'")


def test_calls_out_of_turn_are_refused(npz_run, tmp_path, capsys):
    started = shutil.copytree(npz_run["start"], tmp_path / "started")
    refused(capsys, started, "finish", "--work", started, "--labels",
            answer(started, 0, tmp_path / "a0.csv"), words="round-0 is not the last round")
    spent = shutil.copytree(npz_run["next1"], tmp_path / "spent")
    refused(capsys, spent, "next", "--work", spent, "--labels",
            answer(spent, 2, tmp_path / "a2.csv"), words="the budget is spent")
    done = shutil.copytree(npz_run["work"], tmp_path / "done")
    refused(capsys, done, "finish", "--work", done, "--labels", tmp_path / "a2.csv",
            words="is finished already")
    refused(capsys, started, "start", "--data", npz_run["data"], "--work", started, *FAST,
            words="already holds a pivotal-clean state")
    missing = tmp_path / "nowhere"
    refused(capsys, missing, "next", "--work", missing, "--labels", tmp_path / "a0.csv",
            words="holds no pivotal-clean state")
    assert not missing.exists()


def _one_class(tmp_path):
    x = digits()[0][:30]
    return write_npz(tmp_path / "one.npz", x, np.full(30, 3))


def _unreadable_image(tmp_path):
    root = write_folder(tmp_path / "images", digits()[0][:20], digits()[1][:20])
    with open(os.path.join(root, NAMES[digits()[1][0]], "d0000.png"), "wb") as f:
        f.write(b"not a png")
    return root


def _mixed_sizes(tmp_path):
    root = write_folder(tmp_path / "images", digits()[0][:20], digits()[1][:20])
    Image.new("L", (9, 7)).save(os.path.join(root, NAMES[digits()[1][0]], "d0000.png"))
    return root


def _small(tmp_path):
    return write_npz(tmp_path / "small.npz", digits()[0][:50], digits()[1][:50])


BAD_DATA = [  # (data maker, words)
    (_one_class, "at least two classes are needed"),
    (_unreadable_image, "cannot read the image"),
    (_mixed_sizes, "give an image size (--image-size HxW)"),
    (_small, "--budget 60 must be smaller than the 50 examples"),
]


@pytest.mark.parametrize("make, words", BAD_DATA, ids=[m.__name__ for m, _ in BAD_DATA])
def test_bad_data_is_refused_before_the_work_folder_exists(tmp_path, capsys, make, words):
    data = make(tmp_path)
    work = tmp_path / "work"
    refused(capsys, work, "start", "--data", data, "--work", work, *FAST, words=words)
    assert not work.exists()


@pytest.mark.parametrize("flags, words", [
    (["--budget", "20", "--warmup", "20"], "--warmup 20 must be smaller than --budget 20"),
    (["--method", "base"], "--method must be one of"),
    (["--model", "vgg"], "--model must be one of"),
    (["--model", "lenet5", "--image-size", "8x8"], "--model lenet5 does not fit"),
    (["--image-size", "7"], "is not HxW"),
    (["--epochs", "0"], "--epochs must be an integer >= 1"),
])
def test_bad_flags_are_refused(tmp_path, capsys, flags, words):
    data = write_npz(tmp_path / "train.npz", digits()[0][:200], digits()[1][:200])
    work = tmp_path / "work"
    refused(capsys, work, "start", "--data", data, "--work", work, *FAST, *flags,
            words=words)  # the later of a repeated flag wins


def test_image_folder_round_zero_for_a_person(tmp_path):
    train_x, noisy, _, _, _ = digits()
    root = write_folder(tmp_path / "images", train_x[:200], noisy[:200])
    work = tmp_path / "work"
    assert cli("start", "--data", root, "--work", work, "--budget", "30", "--warmup",
               "12") == 0
    state = json.loads((work / "state.json").read_text())
    assert state["model"] == "lenet5" and state["input_size"] == [28, 28]  # auto, grey
    header, rows = read_csv(work / "round-0" / "to_label.csv")
    assert header[:2] == ["id", "given_label"] and {"label", "path"} <= set(header)
    for row in rows:
        assert row["id"].split("/")[0] == row["given_label"]
        assert os.path.isfile(row["path"]) and row["path"].endswith(row["id"])
    sheet = Image.open(work / "round-0" / "to_label.png")
    assert sheet.width >= 10 * 128 and sheet.height >= 2 * 128  # 12 images, 128 px tiles


@pytest.mark.parametrize("weights, agrees, losses, order", [
    ([0.5, 0.1, 0.9], [True, True, True], [1, 1, 1], [1, 0, 2]),  # weight ascending
    ([0.5, 0.1, 0.9], [True, True, False], [1, 1, 1], [2, 1, 0]),  # disagreeing first
    ([1e-7, 1e-7, 1e-7], [False, False, False], [0.5, 3.0, 1.0], [1, 2, 0]),  # loss on ties
])
def test_rank_suspects(weights, agrees, losses, order):
    assert clean_report.rank_suspects(weights, agrees, losses).tolist() == order


@pytest.mark.parametrize("k, n, low, high", [(0, 10, 0.0, 0.2775), (5, 10, 0.2366, 0.7634),
                                            (8, 20, 0.2188, 0.6134)])
def test_wilson_interval(k, n, low, high):
    assert clean_report.wilson_interval(k, n) == pytest.approx((low, high), abs=1e-4)


def test_plots_are_pngs(tmp_path):
    rng = np.random.default_rng(0)
    w, loss, agree = rng.uniform(size=50), rng.exponential(size=50), rng.uniform(size=50) < .6
    for path in (clean_plots.plot_weights_by_agreement(tmp_path / "a.png", w, agree),
                 clean_plots.plot_weight_vs_loss(tmp_path / "b.png", w, loss, agree),
                 clean_plots.plot_suspect_table(tmp_path / "c.png", [[1, "x", 0.1, "a", "b"]],
                                                ["rank", "id", "weight", "given", "pred"])):
        assert Image.open(path).format == "PNG"


def test_colour_images_pick_resnet_and_tables_an_mlp(tmp_path):
    root = tmp_path / "colour"
    for i in range(12):
        os.makedirs(root / NAMES[i % 2], exist_ok=True)
        Image.fromarray(np.full((10, 12, 3), 20 * i, np.uint8)).save(root / NAMES[i % 2]
                                                                      / f"c{i}.png")
    assert cli("start", "--data", root, "--work", tmp_path / "w1", "--budget", "4",
               "--warmup", "2") == 0
    state = json.loads((tmp_path / "w1" / "state.json").read_text())
    assert state["model"] == "resnet34" and state["input_size"] == [10, 12]
    table = tmp_path / "t.csv"
    table.write_text("a,b,label\n" + "".join(f"{i},{i % 3},{'xy'[i % 2]}\n" for i in range(9)))
    assert cli("start", "--data", table, "--work", tmp_path / "w2", "--budget", "4",
               "--warmup", "2") == 0
    state = json.loads((tmp_path / "w2" / "state.json").read_text())
    assert state["model"] == "mlp" and state["input_size"] is None
    header, rows = read_csv(tmp_path / "w2" / "round-0" / "to_label.csv")
    assert "path" not in header and len(rows) == 2
    assert not (tmp_path / "w2" / "round-0" / "to_label.png").exists()


def test_console_scripts():
    scripts = {e.name: e.value for e in importlib.metadata.entry_points(group="console_scripts")
               if e.name.startswith("pivotal-")}
    # pivotal-run is python -m experiments.run: the same main, its int return the exit code
    assert scripts == {"pivotal-clean": "experiments.clean:main",
                       "pivotal-run": "experiments.run:main"}, "pip install -e . (pyproject)"
    assert shutil.which("pivotal-clean") is not None
    out = subprocess.run(["pivotal-clean", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "Worked example" in out.stdout
    out = subprocess.run(["pivotal-clean", "next", "--work"], capture_output=True, text=True)
    assert out.returncode == 2 and "error:" in out.stderr


# ----------------------------------------------------------------------------- slow


@pytest.mark.slow
def test_image_folder_end_to_end_with_auto_lenet(tmp_path):
    train_x, noisy, _, test_x, test_y = digits()
    root = write_folder(tmp_path / "images", train_x, noisy)
    test = write_folder(tmp_path / "test", test_x, test_y)
    work = tmp_path / "work"
    assert cli("start", "--data", root, "--work", work, "--test", test, "--budget", "60",
               "--warmup", "20", "--rounds", "2", "--epochs", "10") == 0
    for r in (0, 1):
        assert cli("next", "--work", work, "--labels", answer(work, r, tmp_path / "a.csv")) == 0
    assert cli("finish", "--work", work, "--labels", answer(work, 2, tmp_path / "a.csv"),
               "--base") == 0
    assert precision_at_top(work / "suspects.csv") >= 0.7
    summary = json.loads((work / "state.json").read_text())["summary"]
    assert summary["test_accuracy"] > 0.8 and summary["base_test_accuracy"] is not None
    assert Image.open(work / "suspects.png").width >= 10 * 128


@pytest.mark.slow
def test_a_killed_next_reruns_to_the_same_selection(npz_run, tmp_path):
    work = shutil.copytree(npz_run["start"], tmp_path / "work")
    labels = answer(work, 0, tmp_path / "a0.csv")
    argv = [sys.executable, "-m", "experiments.clean", "next", "--work", str(work), "--labels",
            labels]
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpts = work / "train"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        steps = [p for p in ckpts.glob("*/step_*")] if ckpts.exists() else []
        if len(steps) >= 2:
            break
        time.sleep(0.2)
    assert proc.poll() is None, "next ended before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (work / "round-1").exists()
    assert subprocess.run(argv, capture_output=True).returncode == 0
    want = open(os.path.join(npz_run["next0"], "round-1", "to_label.csv")).read()
    assert open(work / "round-1" / "to_label.csv").read() == want
