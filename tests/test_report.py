"""`alldetect report`: the table's numbers, the page's images (on disk and in a real browser), bad input."""

import os
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from PIL import Image
from sklearn.metrics import accuracy_score, f1_score, precision_score, recall_score, roc_auc_score

from alldetect.cli import main
from alldetect.commands.ensemble import ensemble_command
from alldetect.commands.report import report_command
from alldetect.data.images import fingerprint
from alldetect.data.layouts import build_manifest
from alldetect.engine.rundir.files import load_checkpoint
from alldetect.errors import UserError

from fake_runs import edit_checkpoint, make_run, write_predictions

ARCHS = ("proposed", "resnet10t")  # resnet10t: a small timm model, quick to build at 32 x 32
CHROMIUM = Path("/usr/bin/chromium")


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory, tiny_demo):
    """One best.pt per architecture (real weights at 32 x 32), linked into every fake fold run."""
    root = tmp_path_factory.mktemp("checkpoints")
    digest, _ = fingerprint(tiny_demo, build_manifest(tiny_demo)["path"].tolist())
    out = {}
    for arch in ARCHS:
        run = make_run(root / arch, arch, weights=True, input_size=32, fold_file="folds/demo_k3_s42.csv",
                       fingerprint=digest)
        edit_checkpoint(run / "best.pt", leaky_split=False)
        out[arch] = run / "best.pt"
    return out


def _folds(tiny_demo) -> pd.DataFrame:
    """The tiny demo's images in 3 subject-grouped folds, each with subjects of both classes."""
    m = build_manifest(tiny_demo)
    fold_of = {}
    for _, subjects in m.groupby("label")["subject"]:
        fold_of.update({s: i % 3 for i, s in enumerate(sorted(subjects.unique()))})
    return m.assign(fold=m["subject"].map(fold_of))[["path", "subject", "label", "fold"]]


def fake_arch(runs: Path, arch: str, tiny_demo: Path, checkpoints: dict, quality: float, seed: int,
              folds=range(3)) -> Path:
    """runs/<arch>/fold<k>: best.pt, config.yaml, history.csv and oof.csv whose probabilities separate the
    classes better as `quality` grows."""
    rng = np.random.default_rng(seed)
    table = _folds(tiny_demo)
    config = load_checkpoint(checkpoints[arch], mmap=True).meta.config.to_dict()
    for fold in folds:
        run = runs / arch / f"fold{fold}"
        run.mkdir(parents=True)
        os.link(checkpoints[arch], run / "best.pt")
        (run / "config.yaml").write_text(yaml.safe_dump(config))
        rows = table[table["fold"] == fold]
        prob = np.clip(0.5 + quality * (rows["label"] - 0.5) + rng.normal(0, 0.25, len(rows)), 0.001, 0.999).round(6)
        rows.assign(prob_all=prob, pred=(prob >= 0.5).astype(int))[
            ["path", "subject", "label", "prob_all", "pred", "fold"]].to_csv(run / "oof.csv", index=False)
        epochs = np.arange(6)
        pd.DataFrame({"epoch": epochs, "train_loss": 0.7 / (1 + epochs), "val_loss": 0.8 / (1 + 0.5 * epochs),
                      "f1": 0.5 + 0.07 * epochs, "accuracy": 0.5 + 0.07 * epochs, "precision": 0.6, "recall": 0.6,
                      "roc_auc": 0.7, "lr": 1e-3, "seconds": 1.0, "images_per_s": 10.0,
                      "data_wait": 0.0}).to_csv(run / "history.csv", index=False)
    return runs / arch


@pytest.fixture
def trained(workdir, tiny_demo, checkpoints):
    """Two architectures on 3 folds and their ensemble's OOF scores, as training and `ensemble --oof` leave them."""
    fake_arch(workdir / "runs", "proposed", tiny_demo, checkpoints, 0.3, 1)
    fake_arch(workdir / "runs", "resnet10t", tiny_demo, checkpoints, 0.5, 2)
    ensemble_command(["runs/proposed", "runs/resnet10t"], oof=True, name=None)
    return workdir


def _recomputed(oof: pd.DataFrame) -> dict:
    """Mean and standard deviation over folds, straight from scikit-learn."""
    per_fold = []
    for _, g in oof.groupby("fold"):
        y, p, d = g["label"], g["prob_all"], g["pred"]
        per_fold.append({"accuracy": accuracy_score(y, d), "f1": f1_score(y, d, average="weighted"),
                         "precision": precision_score(y, d, zero_division=0), "recall": recall_score(y, d),
                         "roc_auc": roc_auc_score(y, p)})
    frame = pd.DataFrame(per_fold)
    return {k: (frame[k].mean(), frame[k].std(ddof=1)) for k in frame}


def _markdown_row(readme: str, model: str) -> list[str]:
    line = next(line for line in readme.splitlines() if line.startswith(f"| {model} |"))
    return [c.strip() for c in line.strip("|").split("|")]


@pytest.mark.slow
def test_table_numbers_equal_those_recomputed_from_the_oof_files(trained, tiny_demo):
    result = report_command(data=str(tiny_demo), device="cpu")
    numbers = result["numbers"].set_index("model")
    readme = (result["folder"] / "README.md").read_text()
    html = (result["folder"] / "index.html").read_text()
    expected = {arch: pd.concat([pd.read_csv(f) for f in sorted(Path("runs", arch).glob("fold*/oof.csv"))])
                for arch in ARCHS}
    expected["ensemble (proposed+resnet10t)"] = pd.read_csv("submissions/oof_proposed+resnet10t/oof.csv")
    assert list(numbers.index) == list(expected)
    for model, oof in expected.items():
        cells = _markdown_row(readme, model)
        for metric, (mean, std) in _recomputed(oof).items():
            assert numbers.loc[model, f"{metric}_mean"] == pytest.approx(mean, abs=1e-12), (model, metric)
            assert numbers.loc[model, f"{metric}_std"] == pytest.approx(std, abs=1e-12), (model, metric)
            shown = f"{mean:.4f} ± {std:.4f}"
            assert shown in cells, (model, metric, cells)
            assert shown in html
        assert numbers.loc[model, "folds"] == 3 and numbers.loc[model, "images"] == 36
        assert numbers.loc[model, "images_per_s"] > 0
    for arch in ARCHS:  # trainable parameters: the state dict's weights and biases (not batch-norm buffers)
        weights = load_checkpoint(f"runs/{arch}/fold0/best.pt").model
        trainable = sum(v.numel() for k, v in weights.items() if k.endswith(("weight", "bias")))
        assert numbers.loc[arch, "params"] == trainable
    assert "subject-grouped 3-fold" in readme and "subject-grouped 3-fold" in html
    for arch in ARCHS:  # the Runs table: the kept epoch's validation F1 beside the best epoch's (peeking)
        kept_epoch = load_checkpoint(f"runs/{arch}/fold0/best.pt").meta.progress.epoch
        row = next(line for line in readme.splitlines() if line.startswith(f"| {arch} | `runs/{arch}`"))
        assert f"| {0.5 + 0.07 * kept_epoch:.4f} | {0.5 + 0.07 * 5:.4f} |" in row, row


class _Images(HTMLParser):
    def __init__(self):
        super().__init__()
        self.sources, self.remote = [], []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "img":
            self.sources.append(attrs["src"])
        for key in ("src", "href"):
            if re.match(r"^(https?:)?//", attrs.get(key) or ""):
                self.remote.append(attrs[key])


@pytest.mark.slow
def test_every_image_the_page_and_readme_reference_exists_and_is_a_valid_png(trained, tiny_demo):
    folder = report_command(data=str(tiny_demo), device=None)["folder"]
    parser = _Images()
    parser.feed((folder / "index.html").read_text())
    in_markdown = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", (folder / "README.md").read_text())
    assert parser.sources == in_markdown  # the same figures, in the same order
    assert not parser.remote  # self-contained: nothing fetched from elsewhere
    names = {Path(s).name for s in parser.sources}
    assert {"confusion.png", "roc_pr.png", "calibration.png", "training_proposed.png", "training_resnet10t.png",
            "mistakes_proposed.png", "mistakes_resnet10t.png", "mistakes_ensemble_proposed+resnet10t.png"} <= names
    for src in parser.sources:
        path = folder / src
        assert not Path(src).is_absolute() and path.is_file(), src
        with Image.open(path) as im:
            im.verify()
            assert im.format == "PNG"
    assert sorted(p.name for p in (folder / "figures").iterdir()) == sorted(names)  # nothing stale, nothing extra


def _rendered_image_states(page: Path, tmp_path: Path) -> list[str]:
    """Load `page` in headless Chromium with a small script that, once the page has loaded, writes every
    <img>'s state into the DOM ('ok src' when the browser decoded it); --dump-dom returns that DOM."""
    probe = page.with_name("_probe.html")
    script = """<script>
window.addEventListener('load', function () {
  var lines = Array.prototype.slice.call(document.images).map(function (i) {
    return (i.complete && i.naturalWidth > 0 ? 'ok ' : 'broken ') + i.getAttribute('src'); });
  var pre = document.createElement('pre'); pre.id = 'image-check'; pre.textContent = lines.join('\\n');
  document.body.appendChild(pre);
});
</script>"""
    probe.write_text(page.read_text().replace("</body>", script + "</body>"))
    try:
        done = subprocess.run(
            [str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
             "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={tmp_path / 'chrome'}",
             "--virtual-time-budget=10000", "--dump-dom", probe.resolve().as_uri()],
            capture_output=True, text=True, timeout=120)
    finally:
        probe.unlink()
    found = re.search(r'<pre id="image-check">(.*?)</pre>', done.stdout, re.S)
    assert found, f"the page's check did not run (exit {done.returncode}): {done.stderr[-800:]}"
    return found.group(1).split("\n") if found.group(1) else []


@pytest.mark.slow
@pytest.mark.skipif(not CHROMIUM.is_file(), reason=f"no {CHROMIUM}: install Debian's chromium (.ci/run does)")
def test_page_renders_in_a_browser_with_every_image_loaded(trained, tiny_demo, tmp_path):
    folder = report_command(data=str(tiny_demo), device=None)["folder"]
    states = _rendered_image_states(folder / "index.html", tmp_path)
    assert len(states) >= 8 and all(s.startswith("ok ") for s in states), states
    # The check can fail: a figure that is not a PNG any more shows as broken.
    (folder / "figures" / "calibration.png").write_bytes(b"not a png")
    states = _rendered_image_states(folder / "index.html", tmp_path)
    assert "broken figures/calibration.png" in states


def test_leaky_split_is_stated_above_the_table(workdir, tiny_demo, checkpoints):
    runs = fake_arch(workdir / "runs", "proposed", tiny_demo, checkpoints, 0.3, 1)
    for best in runs.glob("fold*/best.pt"):
        edit_checkpoint(best, leaky_split=True)
    readme = (report_command(data=str(tiny_demo), device=None)["folder"] / "README.md").read_text()
    table_at = readme.index("| model |")
    assert "leaky split by image" in readme[:table_at]
    assert "subject-grouped" not in readme


@pytest.mark.slow
def test_runs_that_chose_epochs_on_their_validation_folds_are_called_optimistic(workdir, tiny_demo, checkpoints):
    runs = fake_arch(workdir / "runs", "proposed", tiny_demo, checkpoints, 0.3, 1)
    readme = (report_command(data=str(tiny_demo), device=None)["folder"] / "README.md").read_text()
    assert "Optimistic" not in readme and "OPTIMISTIC" not in readme
    for best in runs.glob("fold*/best.pt"):
        edit_checkpoint(best, config={"select": "outer"})
    readme = (report_command(data=str(tiny_demo), device=None)["folder"] / "README.md").read_text()
    table_at = readme.index("| model |")
    assert "**Optimistic**: proposed kept each fold's epoch" in readme[:table_at]
    assert "outer (OPTIMISTIC)" in readme[table_at:]


def test_bad_input_clear_errors_and_a_page_that_lists_what_is_missing(workdir, tiny_demo, checkpoints, capsys):
    assert main(["report"]) == 2
    assert "no runs folder runs" in capsys.readouterr().err
    (workdir / "runs" / "empty").mkdir(parents=True)
    assert main(["report"]) == 2
    assert "no runs found under runs" in capsys.readouterr().err

    runs = workdir / "runs"
    fake_arch(runs, "proposed", tiny_demo, checkpoints, 0.3, 1)
    fake_arch(runs, "resnet10t", tiny_demo, checkpoints, 0.5, 2)
    (runs / "proposed" / "fold2" / "oof.csv").unlink()  # a run without out-of-fold predictions
    (runs / "resnet10t" / "fold1" / "best.pt").unlink()  # a run of another architecture in its folder
    os.link(checkpoints["proposed"], runs / "resnet10t" / "fold1" / "best.pt")
    (runs / "resnet10t" / "fold1" / "config.yaml").write_text(yaml.safe_dump({"arch": "proposed", "input_size": 32}))
    (runs / "resnet10t" / "fold2" / "config.yaml").write_text(yaml.safe_dump({"arch": "resnet10t", "input_size": 64}))
    broken = _folds(tiny_demo).query("fold == 0")["path"]
    data = workdir / "data"
    shutil.copytree(tiny_demo, data)
    for p in broken:  # every image of fold 0 unreadable: some are among the mistakes shown
        (data / p).write_bytes(b"")

    assert main(["report", "--data", str(data), "--no-speed"]) == 0
    err = capsys.readouterr().err
    readme = Path("reports/proposed+resnet10t/README.md").read_text()
    missing = readme[readme.index("## Missing or left out"):]
    assert "runs/proposed/fold2: no oof.csv" in err and "runs/proposed/fold2: no oof.csv" in missing
    assert "runs/resnet10t/fold2" in missing and "says input_size=64" in missing
    assert "runs/resnet10t/fold1: trained as proposed at input size 32, unlike the other runs" in missing
    assert "cannot read image" in missing and "empty tile" in missing
    assert "out-of-fold predictions of 2 of its 3 folds only" in missing
    assert "| proposed | 2 |" in readme and "| resnet10t | 1 |" in readme  # the rows cover the folds that are there


def test_checkpoint_whose_weights_do_not_fit_its_config_is_left_out(workdir, tiny_demo, checkpoints, capsys):
    runs = fake_arch(workdir / "runs", "proposed", tiny_demo, checkpoints, 0.3, 1)
    best = runs / "fold1" / "best.pt"
    edit_checkpoint(best, config={"input_size": 128})  # the flattened size of the classifier changes with the input
    (runs / "fold1" / "config.yaml").write_text(yaml.safe_dump(load_checkpoint(best, mmap=True).meta.config.to_dict()))
    result = report_command(data=str(tiny_demo), device=None)
    assert any("fold1: its best.pt weights do not fit a proposed at input size 128" in m for m in result["missing"])
    assert result["numbers"].loc[0, "folds"] == 2


@pytest.mark.slow
def test_stale_ensemble_is_left_out_and_said_so(trained, tiny_demo):
    oof = Path("runs/proposed/fold0/oof.csv")
    frame = pd.read_csv(oof)
    frame.assign(prob_all=(1 - frame["prob_all"]).round(6)).to_csv(oof, index=False)  # retrained after ensembling
    result = report_command(data=str(tiny_demo), device=None)
    assert list(result["numbers"]["model"]) == list(ARCHS)
    assert any("oof_proposed+resnet10t" in m and "differ" in m for m in result["missing"])


@pytest.mark.slow
@pytest.mark.parametrize("exchange", [True, False])  # renameat2's exchange, and moving the old one aside first
def test_report_replaces_an_older_one_whole(trained, tiny_demo, monkeypatch, exchange):
    import alldetect.atomic as atomic

    if not exchange:
        monkeypatch.setattr(atomic, "_exchange", lambda a, b: False)
    report_command(data=str(tiny_demo), device=None, name="proposed+resnet10t")
    stale = Path("reports/proposed+resnet10t/figures/old.png")
    stale.write_bytes(b"x")  # a figure an older version drew
    folder = report_command(data=str(tiny_demo), device=None, name="proposed+resnet10t")["folder"]
    assert not stale.exists() and (folder / "index.html").is_file()
    assert not [p for p in folder.parent.iterdir() if p.name.startswith(".")]  # no temporary folders left


def test_a_report_never_removes_what_it_did_not_write(workdir, tiny_demo, checkpoints, capsys, monkeypatch):
    """Names that are no folder of their own ('./' made `report --out runs` remove every run), and folders that
    hold a user's files or runs: refused before any work, and everything stays."""
    runs = workdir / "runs"
    fake_arch(runs, "proposed", tiny_demo, checkpoints, 0.3, 1)
    before = sorted(str(p) for p in runs.rglob("*"))
    for name in ("./", ".", "..", "", "../x", ".hidden", "x" * 300):
        assert main(["report", "--runs", "runs", "--out", "runs", "--name", name, "--no-speed"]) == 2, name
        err = capsys.readouterr().err
        assert "a report name must start with a letter or digit" in err and "Traceback" not in err, (name, err)
    (workdir / "sub").mkdir()
    monkeypatch.chdir(workdir / "sub")
    assert main(["report", "--runs", "../runs", "--out", ".", "--name", ".", "--no-speed"]) == 2  # was a traceback
    assert "a report name must start" in capsys.readouterr().err
    monkeypatch.chdir(workdir)
    assert main(["report", "--out", "runs", "--name", "proposed", "--no-speed"]) == 2  # a valid name: a run folder
    err = capsys.readouterr().err
    assert "runs/proposed holds files `alldetect report` did not write (fold0, fold1, fold2)" in err
    assert "report replaces only its own earlier output" in err
    mine = workdir / "reports" / "mine"
    mine.mkdir(parents=True)
    (mine / "notes.txt").write_text("my notes")
    assert main(["report", "--name", "mine", "--no-speed"]) == 2
    assert "reports/mine holds files `alldetect report` did not write (notes.txt)" in capsys.readouterr().err
    (mine / "notes.txt").rename(mine / "index.html")  # a page, but not a report's
    assert main(["report", "--name", "mine", "--no-speed"]) == 2
    assert "reports/mine is not a report of `alldetect report`" in capsys.readouterr().err
    assert (mine / "index.html").read_text() == "my notes"
    assert sorted(str(p) for p in runs.rglob("*")) == before
    assert sorted(p.name for p in (workdir / "reports").iterdir()) == ["mine"]  # no temporary folder left


@pytest.mark.slow
def test_a_report_with_a_users_file_added_is_not_replaced(trained, tiny_demo):
    folder = report_command(device=None)["folder"]
    (folder / "figures" / "my-sketch.svg").write_text("<svg/>")
    with pytest.raises(UserError, match=r"holds files `alldetect report` did not write \(figures/my-sketch.svg\)"):
        report_command(device=None)
    assert (folder / "figures" / "my-sketch.svg").is_file() and (folder / "index.html").is_file()


@pytest.mark.slow
@pytest.mark.parametrize("umask, mode", [(0o022, 0o755), (0o002, 0o775)])
def test_the_report_folder_gets_the_users_umask(trained, umask, mode):
    old = os.umask(umask)
    try:
        folder = report_command(device=None)["folder"]
    finally:
        os.umask(old)
    assert folder.stat().st_mode & 0o777 == mode and (folder / "figures").stat().st_mode & 0o777 == mode
    assert (folder / "index.html").stat().st_mode & 0o777 == mode & 0o666


@pytest.mark.slow
def test_a_report_that_cannot_be_written_says_which_file_and_keeps_the_earlier_one(trained):
    import resource

    folder = report_command(device=None)["folder"]
    before = {p.relative_to(folder): p.read_bytes() for p in folder.rglob("*") if p.is_file()}
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, hard))  # ulimit -f 20: every figure is larger
    try:
        with pytest.raises(UserError, match=r"could not write \w+\.png of report reports/proposed\+resnet10t "
                                            r"\(File too large\): the earlier report .* is kept as it was"):
            report_command(device=None)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    assert {p.relative_to(folder): p.read_bytes() for p in folder.rglob("*") if p.is_file()} == before
    assert not [p for p in folder.parent.iterdir() if p.name.startswith(".")]


@pytest.mark.slow
def test_a_mean_over_fewer_folds_than_the_row_says_is_marked(workdir, tiny_demo, checkpoints):
    """A fold of one class has no ROC-AUC, and a fold without history.csv no kept F1: the row says over how many
    folds its mean is, not just the row's fold count."""
    runs = fake_arch(workdir / "runs", "proposed", tiny_demo, checkpoints, 0.3, 1)
    oof = pd.read_csv(runs / "fold2/oof.csv")
    oof[oof["label"] == 1].to_csv(runs / "fold2/oof.csv", index=False)  # its normal people moved away
    (runs / "fold1/history.csv").unlink()
    result = report_command(device=None)
    readme = (result["folder"] / "README.md").read_text()
    row = _markdown_row(readme, "proposed")
    assert row[1] == "3" and row[6].endswith("(2 of 3 folds)") and not row[5].endswith("folds)"), row
    runs_row = next(line for line in readme.splitlines() if line.startswith("| proposed | `runs/proposed`"))
    assert "(2 of 3 folds)" in runs_row
    per_fold = next(line for line in readme.splitlines() if line.startswith("| proposed | 2 |"))
    assert per_fold.rstrip(" |").endswith("| -"), per_fold


@pytest.mark.slow
def test_images_that_moved_are_listed_with_what_to_do(trained):
    result = report_command(device=None)  # no --data, and the runs' recorded data root is not here
    assert any("the images of proposed are not here" in m and "pass --data DIR" in m for m in result["missing"])
    assert (result["folder"] / "figures" / "mistakes_proposed.png").is_file()


def test_unusable_runs_only_is_an_error_that_says_why(workdir, tiny_demo, checkpoints, capsys):
    runs = fake_arch(workdir / "runs", "proposed", tiny_demo, checkpoints, 0.3, 1)
    for oof in runs.glob("fold*/oof.csv"):
        oof.unlink()
    with pytest.raises(UserError, match="none of the runs under runs can be used.*no oof.csv"):
        report_command(device=None)


@pytest.mark.slow
def test_people_table_shows_each_persons_mean_probability_and_a_person_wrong_as_a_whole(workdir, tiny_demo,
                                                                                       checkpoints):
    folder = fake_arch(workdir / "runs", "proposed", tiny_demo, checkpoints, 0.5, 1)
    oof_file = folder / "fold1" / "oof.csv"
    oof = pd.read_csv(oof_file, dtype={"subject": str})
    person = oof.loc[oof["label"] == 1, "subject"].iloc[0]  # one `all` person, every image called `hem`
    oof.loc[oof["subject"] == person, "prob_all"] = 0.2
    oof["pred"] = (oof["prob_all"] >= 0.5).astype(int)
    oof.to_csv(oof_file, index=False)
    result = report_command(data=str(tiny_demo), device=None)
    readme = (result["folder"] / "README.md").read_text()
    html = (result["folder"] / "index.html").read_text()
    people = readme[readme.index("### People"):].split("\n\n")[1].splitlines()[2:]
    everyone = pd.concat([pd.read_csv(f, dtype={"subject": str}) for f in sorted(folder.glob("fold*/oof.csv"))])
    assert len(people) == everyone["subject"].nunique()
    assert people[0].startswith(f"| {person} | all |") and people[0].endswith("| 0.20 / 0% **WRONG** |")
    assert sum("WRONG" in row for row in people) == 1 and "<strong>WRONG</strong>" in html
    for subject, g in everyone.groupby("subject"):  # each person's numbers, recomputed from the oof files
        row = next(r for r in people if r.startswith(f"| {subject} |"))
        assert f"| {len(g)} | {g['prob_all'].mean():.2f} / {g['pred'].mean():.0%}" in row

    # a labelled held-out set scored by `ensemble --name`: its people, on the page too
    for k in range(3):
        write_predictions(folder / f"fold{k}", "other", ["1.bmp", "2.bmp", "3.bmp", "4.bmp"], [0.9, 0.8, 0.3, 0.6],
                          labels=[0, 0, 1, 1], subjects=["H7", "H7", "8", "8"])
    ensemble_command(["runs/proposed"], oof=False, name="other")
    readme = (report_command(data=str(tiny_demo), device=None)["folder"] / "README.md").read_text()
    above = readme[:readme.index("`submissions/other.csv` per person, worst first")].strip()  # the table above it
    rows = above.rsplit("\n\n", 1)[1].splitlines()[2:]
    assert rows == ["| H7 | hem | 2 | 0.85 | 100% | **WRONG** |", "| 8 | all | 2 | 0.45 | 50% | right |"]
