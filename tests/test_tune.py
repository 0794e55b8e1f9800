"""alldetect tune: Optuna studies of real training runs, on SQLite and (where a server is given) PostgreSQL."""

import os
import shutil
import subprocess
import sys
import time
import uuid

import optuna
import pandas as pd
import pytest
import yaml

from alldetect.cli import main
from alldetect.commands.tune import tune_command
from alldetect.config import load_config
from alldetect.data.prepare import resolve_folds
from alldetect.errors import UserError
from alldetect.search_space import load_search_space, nest
from alldetect.tune import TrialSeededSampler, driver_url, open_storage

from conftest import FAST, REPO, TINY

POSTGRES = os.environ.get("ALLDETECT_TEST_POSTGRES")
STORAGES = ["sqlite", pytest.param("postgresql", marks=pytest.mark.skipif(
    not POSTGRES, reason="ALLDETECT_TEST_POSTGRES is not set (.ci/run starts a PostgreSQL server and sets it)"))]


@pytest.fixture
def configs(tmp_path, monkeypatch):
    """A copy of configs/ so that tuned/<arch>.yaml lands in the test's folder, not the repository's."""
    folder = tmp_path / "configs"
    shutil.copytree(REPO / "configs", folder)
    monkeypatch.setenv("ALLDETECT_CONFIGS", str(folder))
    return folder


def _storage_url(kind: str, workdir) -> str:
    return POSTGRES if kind == "postgresql" else f"sqlite:///{workdir / 'shared.db'}"


def _load(name: str, url: str) -> optuna.Study:
    return optuna.load_study(study_name=name, storage=open_storage(url, heartbeat=60))


def _tune(root, trials, *extra, **options):
    """A study of TINY's trials (timm's tiny test network, with the search space of configs/search/default.yaml)."""
    return tune_command(TINY, [*FAST, f"data.root={root}", *extra], trials=trials, **options)


@pytest.mark.slow
def test_trials_are_real_runs_and_the_best_becomes_the_tuned_config(tiny_data, workdir, configs, capsys):
    study = _tune(tiny_data, 2, folds="fold0,fold1")
    assert (workdir / f"studies/{TINY}.db").is_file()
    assert [t.state.name for t in study.trials] == ["COMPLETE", "COMPLETE"]
    for t in study.trials:
        for fold in (0, 1):
            run = workdir / f"runs/tune/{TINY}/trial{t.number}/fold{fold}"
            assert {"config.yaml", "history.csv", "best.pt", "oof.csv"} <= {p.name for p in run.iterdir()}
            saved = yaml.safe_load((run / "config.yaml").read_text())
            assert saved["lr"] == t.params["lr"] and saved["batch_size"] == t.params["batch_size"]
            assert saved["study"] == TINY  # the W&B group
        assert t.value == pytest.approx((t.user_attrs["fold0_f1"] + t.user_attrs["fold1_f1"]) / 2)
        # validation weighted F1 after every epoch; fold1's epochs follow fold0's
        assert sorted(t.intermediate_values) == [0, 1, 2, 3]
    best = max(study.trials, key=lambda t: (t.value, -t.number))
    tuned = configs / f"tuned/{TINY}.yaml"
    text = tuned.read_text()
    assert f"study '{TINY}'" in text and f"trial {best.number}, mean weighted F1 {best.value:.4f}" in text
    assert yaml.safe_load(text) == best.params
    out = capsys.readouterr().out
    assert f"best: trial {best.number}" in out and "tuned=true" in out
    cfg = load_config(TINY, ["tuned=true"])
    assert (cfg.lr, cfg.batch_size, cfg.dropout) == (best.params["lr"], best.params["batch_size"],
                                                     best.params["dropout"])

    first = [t.params for t in study.trials]
    again = _tune(tiny_data, 1, folds="fold0,fold1")  # the same command resumes the study
    assert len(again.trials) == 3
    assert again.trials[2].params not in first  # and proposes a new point, not its first one again
    assert "2 trial(s) so far; adding 1" in capsys.readouterr().out


def test_the_same_seed_proposes_the_same_first_trials(configs):
    space = load_search_space(configs / "search/proposed.yaml", load_config("proposed"))

    def proposals(seed, n=3):
        study = optuna.create_study(direction="maximize", sampler=TrialSeededSampler(seed))
        study.optimize(lambda trial: space.suggest(trial)["dropout"], n_trials=n)
        return [t.params for t in study.trials]

    first = proposals(42)
    assert first == proposals(42)
    assert first != proposals(43)
    assert len({repr(p) for p in first}) == 3


@pytest.mark.slow
def test_pruned_trials_stop_early_and_the_study_goes_on(tiny_data, workdir, configs, monkeypatch, capsys):
    import alldetect.tune as tune

    monkeypatch.setattr(tune, "make_pruner", lambda name: optuna.pruners.ThresholdPruner(lower=1.1))
    study = _tune(tiny_data, 2, "epochs=3")
    assert [t.state.name for t in study.trials] == ["PRUNED", "PRUNED"]
    history = pd.read_csv(workdir / f"runs/tune/{TINY}/trial0/fold0/history.csv")
    assert len(history) == 1  # stopped after the first epoch's report
    out = capsys.readouterr().out
    assert "trial 1 pruned" in out and "at fold0 epoch 1" in out and "no trial has completed yet" in out
    assert not (configs / f"tuned/{TINY}.yaml").exists()


@pytest.mark.slow
def test_a_diverged_trial_fails_and_the_study_goes_on(tiny_data, workdir, configs, monkeypatch, capsys):
    import alldetect.tune as tune
    from alldetect.engine.fit import TrainingDiverged

    real_fit = tune.fit_fold

    def diverge_first(cfg, fold, folds, run_dir, **kw):
        if "trial0" in str(run_dir):
            raise TrainingDiverged("loss became nan at epoch 1")
        return real_fit(cfg, fold, folds, run_dir, **kw)

    monkeypatch.setattr(tune, "fit_fold", diverge_first)
    study = _tune(tiny_data, 2)
    assert [t.state.name for t in study.trials] == ["FAIL", "COMPLETE"]
    assert "trial 0 failed" in capsys.readouterr().out and "loss became nan" in study.trials[0].user_attrs["error"]


def test_search_space_numbers_written_like_1e_2_are_numbers(tmp_path):
    """YAML reads 1e-2 (no dot) as a string; the config accepts it as a number, and so does a search space."""
    path = tmp_path / "space.yaml"
    path.write_text("lr: {type: float, low: 1e-5, high: 1e-2, log: true}\nepochs: {type: int, low: '2', high: 4}\n")
    space = load_search_space(path, load_config("proposed"))
    assert space.params["lr"] == {"type": "float", "low": 1e-5, "high": 1e-2, "log": True, "step": None}
    assert (space.params["epochs"]["low"], space.params["epochs"]["high"]) == (2, 4)


@pytest.mark.parametrize("entry, message", [
    ("learning_rate: {type: float, low: 0.1, high: 1.0}", "unknown config key"),
    ("lr: {type: float, low: 0.01, high: 0.01}", "empty range"),
    ("lr: {type: float, low: 0.1, high: 0.01, log: true}", r"inverted range, low=0.1 is above high=0.01"),
    ("dropout: {type: float, low: 0.0, high: 1.0}", r"1.0 is not a valid dropout"),
    ("batch_size: {type: float, low: 8, high: 64}", r"is not a valid batch_size"),
    ("batch_size: {type: categorical, choices: []}", "non-empty list of choices"),
    ("optimizer: {type: categorical, choices: [sgd, adamx]}", r"'adamx' is not a valid optimizer"),
    ("lr: {type: float, low: 0.0, high: 0.1, log: true}", "log range needs low > 0"),
    ("lr: {type: float, lo: 0.0, high: 0.1}", "unknown field"),
    ("lr: [0.001, 0.1]", "needs a mapping with type"),
    ("data.root: {type: categorical, choices: [a, b]}", "cannot be searched"),
    ("aug: {rotate: {type: float, low: 0, high: 1}}", r"nested keys with dots, e.g. aug.rotate"),
    ("epochs: {type: int, low: 2, high: 4, step: 5}", r"space.yaml, key 'epochs': step 5 is wider than the range "
                                                      r"2..4, so the search would try 2 alone"),
    ("dropout: {type: float, low: 0.1, high: 0.3, step: 0.5}", r"key 'dropout': step 0.5 is wider than the range"),
])
def test_bad_search_space_is_a_clear_error(tmp_path, entry, message):
    path = tmp_path / "space.yaml"
    path.write_text(entry + "\n")
    with pytest.raises(UserError, match=message):
        load_search_space(path, load_config("proposed"))


def test_a_step_as_wide_as_the_range_tries_both_ends(tmp_path):
    path = tmp_path / "space.yaml"
    path.write_text("dropout: {type: float, low: 0.1, high: 0.3, step: 0.2}\n")  # 0.3 - 0.1 < 0.2 in floats
    assert load_search_space(path, load_config("proposed")).params["dropout"]["step"] == 0.2


@pytest.mark.parametrize("name", ["../../escape", "a/b", "..", ".", "", "/tmp/x", ".hidden", "x" * 101])
def test_a_study_name_cannot_leave_the_studies_folder(name, workdir, capsys):
    assert main(["tune", "proposed", "--trials", "1", "--study", name]) == 2
    assert f"--study {name!r}: use up to 100 letters" in capsys.readouterr().err
    assert not any(workdir.parent.glob("*.db")) and not (workdir / "studies").exists()


def test_any_config_key_can_be_searched(tmp_path):
    path = tmp_path / "space.yaml"
    path.write_text("aug.rotate: {type: float, low: 0.0, high: 0.5}\nepochs: {type: int, low: 2, high: 6, step: 2}\n"
                    "optimizer: {type: categorical, choices: [sgd, adamw]}\n")
    space = load_search_space(path, load_config("proposed"))
    assert space.params["epochs"] == {"type": "int", "low": 2, "high": 6, "log": False, "step": 2}
    assert nest({"aug.rotate": 0.3, "lr": 1e-3}) == {"aug": {"rotate": 0.3}, "lr": 1e-3}


def test_bad_input_exits_2_with_a_message(tiny_data, workdir, configs, capsys):
    base = ["tune", "proposed", "--trials", "1", *FAST, f"data.root={tiny_data}"]
    bad = workdir / "bad.yaml"
    bad.write_text("lr: {type: float, low: 0.1, high: 0.01}\n")
    assert main([*base, "--space", str(bad)]) == 2
    assert "inverted range" in capsys.readouterr().err

    url = "postgresql://alldetect:secret@127.0.0.1:1/studies"
    assert main([*base, "--storage", url]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: cannot open the study storage postgresql://alldetect:***@127.0.0.1:1/studies")
    assert "secret" not in err and "Traceback" not in err and "sqlalchemy" not in err.lower()

    assert main([*base, "--storage", f"sqlite:///{workdir}/no/such/folder/x.db"]) == 2
    assert f"{workdir}/no/such/folder/x.db" in capsys.readouterr().err

    assert main([*base, "--folds", "fold0,fold9"]) == 2
    assert "'fold9' is not a fold" in capsys.readouterr().err


def test_a_worker_that_loses_the_table_creation_race_uses_the_winners_tables(workdir, monkeypatch):
    """Two workers opening a new database at once: one gets a duplicate-row error (SQLite: alembic_version)."""
    from sqlalchemy.exc import IntegrityError

    real, calls = optuna.storages.RDBStorage, []

    def lose_once(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise IntegrityError("INSERT INTO alembic_version", {}, Exception("UNIQUE constraint failed"))
        return real(*args, **kwargs)

    monkeypatch.setattr(optuna.storages, "RDBStorage", lose_once)
    assert isinstance(open_storage(f"sqlite:///{workdir / 'race.db'}", heartbeat=60), real) and len(calls) == 2


@pytest.mark.slow
def test_a_study_refuses_another_search_space_or_recipe(tiny_data, workdir, configs, capsys):
    _tune(tiny_data, 1)
    base = ["tune", TINY, "--trials", "1", *FAST, f"data.root={tiny_data}"]
    assert main([*base, "epochs=3"]) == 2
    assert "was made with other settings (epochs: 2 -> 3)" in capsys.readouterr().err
    space = configs / "search/default.yaml"  # TINY has no search space of its own
    space.write_text(space.read_text().replace("high: 0.5", "high: 0.4"))
    assert main(base) == 2
    err = capsys.readouterr().err
    assert f"study '{TINY}' in sqlite:///studies/{TINY}.db has a different search space" in err
    assert "dropout:" in err and "lr:" not in err
    assert main([*base, "--study", "another"]) == 0  # a new study may use the new space


def test_tuned_true_adds_the_tuned_layer(configs):
    with pytest.raises(UserError, match=r"tuned=true but .*tuned/proposed.yaml does not exist: run `alldetect tune"):
        load_config("proposed", ["tuned=true"])
    (configs / "tuned").mkdir()
    (configs / "tuned/proposed.yaml").write_text("# header\nlr: 0.005\naug:\n  rotate: 0.25\n")
    cfg = load_config("proposed", ["tuned=true"], profile="demo")
    assert cfg.lr == 0.005 and cfg.aug.rotate == 0.25 and cfg.input_size == 64  # after the arch and demo layers
    assert load_config("proposed", ["tuned=true", "lr=0.1"]).lr == 0.1  # overrides still win
    assert load_config("proposed").lr == load_config("proposed", ["tuned=false"]).lr != 0.005  # off by default


TINY_TRIAL = ["epochs=1", "optimizer=adamw"]  # adamw: scores that differ between trials


def _worker(workdir, root, url, name, trials, *extra):
    cmd = [sys.executable, "-m", "alldetect", "tune", TINY, "--trials", str(trials), "--study", name,
           "--storage", url, *FAST, f"data.root={root}", *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # two workers on two cores: no oversubscribed threads
    return subprocess.Popen(cmd, cwd=workdir, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


@pytest.mark.slow
@pytest.mark.parametrize("kind", STORAGES)
def test_two_workers_share_one_study(kind, tiny_data, workdir, configs, capsys):
    url, name = _storage_url(kind, workdir), f"shared-{uuid.uuid4().hex[:8]}"
    resolve_folds(load_config(TINY, [*FAST, f"data.root={tiny_data}"]))  # the fold file, made once
    workers = [_worker(workdir, tiny_data, url, name, 3, *TINY_TRIAL) for _ in range(2)]
    outputs = [w.communicate(timeout=600)[0] for w in workers]
    assert [w.returncode for w in workers] == [0, 0], outputs
    study = _load(name, url)
    numbers = [t.number for t in study.trials]
    assert sorted(numbers) == list(range(6))  # every trial number once: the totals add up
    assert {t.state.name for t in study.trials} <= {"COMPLETE", "PRUNED"}
    reported = [line.split()[1] for out in outputs for line in out.splitlines() if line.startswith("trial ")]
    assert sorted(map(int, reported)) == list(range(6))  # each worker ran its own three
    assert len({repr(t.params) for t in study.trials}) == 6  # and proposed its own points
    complete = sorted((t for t in study.trials if t.state.name == "COMPLETE"), key=lambda t: t.number)

    # A report-only run names the best trial and writes its settings.
    tune_command(TINY, [*FAST, f"data.root={tiny_data}", *TINY_TRIAL], trials=0, study=name, storage=url)
    top = max(t.value for t in complete)
    best = next(t for t in complete if t.value == top)  # the earliest of the best: ties go to the first
    assert f"best: trial {best.number}, mean weighted F1 {best.value:.4f}" in capsys.readouterr().out
    assert yaml.safe_load((configs / f"tuned/{TINY}.yaml").read_text()) == best.params


def _wait_for(condition, what: str, timeout: float = 120.0) -> None:
    """Poll `condition` until it holds; fail naming `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"waited {timeout:.0f} s for {what}")
        time.sleep(0.05)


SLEEPING_WORKER = """
import sys, time
import alldetect.tune
alldetect.tune.fit_fold = lambda *args, **kwargs: time.sleep(600)  # a trial that only ends when killed
from alldetect.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.slow
@pytest.mark.parametrize("kind", STORAGES)
def test_a_killed_workers_trial_is_marked_failed(kind, tiny_data, workdir, configs):
    url, name = _storage_url(kind, workdir), f"killed-{uuid.uuid4().hex[:8]}"
    args = ["tune", TINY, "--trials", "1", "--study", name, "--storage", url, "--heartbeat", "1",
            *FAST, f"data.root={tiny_data}"]
    worker = subprocess.Popen([sys.executable, "-c", SLEEPING_WORKER, *args], cwd=workdir,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    # Conditions, each polled until it holds (no fixed sleeps): optuna's heartbeat-staleness query, once with a
    # grace period of ~0 (true as soon as the trial has recorded a heartbeat), once with the workers' 2 s.
    # (driver_url: a bare postgresql:// means psycopg 3 to SQLAlchemy 2.1; alldetect installs psycopg2)
    beat = optuna.storages.RDBStorage(driver_url(url), heartbeat_interval=1, grace_period=1e-6)  # type: ignore[arg-type]
    stale = optuna.storages.RDBStorage(driver_url(url), heartbeat_interval=1)

    def study_id() -> int | None:
        try:
            return _load(name, url)._study_id
        except KeyError:  # the study does not exist yet
            return None

    try:
        _wait_for(lambda: worker.poll() is not None or (study_id() is not None and
                  [t.state.name for t in _load(name, url).trials] == ["RUNNING"]), "the trial to start")
        _wait_for(lambda: worker.poll() is not None or bool(beat._get_stale_trial_ids(study_id())),
                  "the trial's first heartbeat")
        assert worker.poll() is None, "the worker ended before it was killed"
    finally:
        worker.kill()
        worker.wait()
    assert [t.state.name for t in _load(name, url).trials] == ["RUNNING"]  # what a killed worker leaves
    _wait_for(lambda: bool(stale._get_stale_trial_ids(study_id())), "the grace period of two heartbeats to pass")
    study = tune_command(TINY, [*FAST, f"data.root={tiny_data}"], trials=1, study=name, storage=url,
                         heartbeat=1)
    assert [t.state.name for t in study.trials] == ["FAIL", "COMPLETE"]


@pytest.mark.slow
def test_tune_on_the_demo_data_and_again(workdir, configs, capsys, monkeypatch):
    """`alldetect tune ARCH --trials N` with no data configured, twice: one study grows."""
    import alldetect.data.prepare as prepare
    from alldetect.data.demo import make_demo_data

    # the demo data as ./train.sh makes them, with fewer people and images (600 images take longer than the trials)
    monkeypatch.setattr(prepare, "make_demo_data", lambda out: make_demo_data(out, subjects=14, per_subject=2))
    fast = ["input_size=32", "epochs=1", "max_batches=2", "data.num_workers=0", "wandb=off"]
    assert main(["tune", TINY, "--trials", "1", *fast]) == 0
    assert main(["tune", TINY, "--trials", "1", *fast]) == 0
    out = capsys.readouterr().out
    assert "SYNTHETIC demo data" in out and f"study '{TINY}-demo' in sqlite:///studies/{TINY}-demo.db" in out
    assert "demo-tune.yaml after the demo profile (epochs=1)" in out  # the command line still wins
    assert len(_load(f"{TINY}-demo", f"sqlite:///studies/{TINY}-demo.db").trials) == 2
    assert "of the SYNTHETIC demo data" in (configs / f"tuned/{TINY}.yaml").read_text()


def test_a_worker_joining_while_the_first_records_the_study_sees_all_of_it_or_none():
    """Two workers started together: the second may read the study while the first is still writing what the
    study is (one attribute at a time); it must not see half of it and refuse a study of its own settings."""
    from alldetect.tune import check_study_matches

    study = optuna.create_study(study_name="s", storage=optuna.storages.InMemoryStorage())
    identity = {"arch": "proposed", "folds": [0], "split": "abc", "search_space": {"lr": {"low": 1e-5}},
                "settings": {"epochs": 1}}
    write, joined = study.set_user_attr, []

    def write_then_someone_joins(key, value):
        write(key, value)
        if not joined:  # after the first worker's first write, the second worker checks the study
            joined.append(key)
            check_study_matches(study, "sqlite:///x.db", identity)

    study.set_user_attr = write_then_someone_joins
    check_study_matches(study, "sqlite:///x.db", identity)
    assert joined and {k: study.user_attrs[k] for k in identity} == identity and study.user_attrs["alldetect"]
