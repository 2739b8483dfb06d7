"""launchers/slurm.py against a real SLURM cluster started on loopback (tests/slurm_cluster.py).

No fake sbatch/srun/scontrol: slurmctld + 2 slurmd run here for the module, and are stopped by pid afterwards.
The cluster has no accounting (slurmdbd), so `--wait` follows jobs through result files and scontrol.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from vkd_dist.slurm import TrainJob, _parse_time, build_parser, sbatch_script, spec_from_args, training_command
from vkd_dist.slurm_env import attempt_resume, restart_count

REPO = Path(__file__).resolve().parent.parent
LAUNCHER = REPO / "launchers" / "slurm.py"
sys.path.insert(0, str(Path(__file__).resolve().parent))
from slurm_cluster import ClusterUnavailable, LoopbackCluster, ensure_installed  # noqa: E402

TOKENIZER: list[str] = []


def submitted_job_id(run: Path):
    """The SLURM job id once submitit has submitted the job, else None."""
    files = list((run / "submitit").glob("*_submitted.pkl")) if (run / "submitit").is_dir() else []
    return files[0].name.split("_")[0] if files else None


def release_requeued(cluster, job_id: str) -> bool:
    """SLURM holds a requeued job back for ~2 minutes (BeginTime); start it now so tests don't wait.
    True once the job was found requeued and released."""
    info = cluster.run(["scontrol", "show", "job", "-o", job_id], check=False).stdout
    if "JobState=PENDING" in info and "Restarts=1" in info:
        cluster.run(["scontrol", "update", f"JobId={job_id}", "StartTime=now"])
        return True
    return False


def tiny(data: Path, steps: int, ckpt_every: int = 5) -> list[str]:
    return [f"data.path={data}", "data.synthetic.num_train=64", "data.synthetic.num_val=32",
            "data.synthetic.num_test=32", "data.synthetic.image_size=64", "data.image_size=64", "data.batch_size=8",
            "data.eval_batch_size=32", "data.num_workers=0", f"train.max_steps={steps}", "optim.warmup_steps=0",
            f"train.eval_every={steps}",
            f"train.ckpt_every={ckpt_every}", "logging.progress=false", "logging.log_every=5", "optim.warmup_steps=0",
            "model.image_encoder=vit_small_patch16_224",
            "model.image_encoder_kwargs={depth: 2, embed_dim: 48, num_heads: 2, patch_size: 16}",
            *([f"model.tokenizer={TOKENIZER[0]}"] if TOKENIZER else [])]


# ----------------------------------------------------------------------------------------- no cluster needed
def test_slurm_dry_run_and_parsing(tmp_path, capsys):
    assert _parse_time("24:00:00") == 1440 and _parse_time("30") == 30 and _parse_time("1-02:00:00") == 1560
    args = build_parser().parse_args(["--nodes", "4", "--gpus-per-node", "8", "--partition", "gpu", "--time",
                                      "2:00:00", "--strategy", "deepspeed-zero3", "--sbatch", "account=abc",
                                      "--sbatch", "exclusive", f"run_dir={tmp_path / 'run'}", "train.max_steps=7",
                                      "optim.warmup_steps=0"])
    spec = spec_from_args(args)
    assert spec.tasks_per_node == 8 and spec.gpus_per_node == 8 and spec.timeout_min == 120
    assert spec.strategy == "deepspeed_zero3"  # the old hyphenated spelling is an alias
    script = sbatch_script(spec)
    for line in ("#SBATCH --nodes=4", "#SBATCH --ntasks-per-node=8", "#SBATCH --gpus-per-node=8",
                 "#SBATCH --partition=gpu", "#SBATCH --account=abc", "#SBATCH --exclusive", "#SBATCH --requeue",
                 "#SBATCH --signal=USR2@120", "#SBATCH --time=120", "--kill-on-bad-exit=1",
                 f"{tmp_path / 'run' / 'submitit'}"):
        assert line in script, line
    proc = subprocess.run([sys.executable, str(LAUNCHER), "--nodes", "2", "--cpu", "--dry-run",
                           f"run_dir={tmp_path / 'run'}"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "#SBATCH --nodes=2" in proc.stdout and "vkd_dist.train" in proc.stdout and "resume=latest" in proc.stdout
    assert not (tmp_path / "run").exists()  # a dry run submits and creates nothing


def test_early_time_limit_notice_is_warned_about_at_submission(tmp_path, capsys):
    """slurmctld sends --signal up to 30 s early: a delay that leaves no time before that is flagged."""
    spec_from_args(build_parser().parse_args(["--time", "1", "--signal-delay-s", "45", "--dry-run",
                                              f"run_dir={tmp_path / 'run'}"]))
    assert "SLURM may send the notice as soon as the job starts" in capsys.readouterr().err
    spec_from_args(build_parser().parse_args(["--time", "1", "--signal-delay-s", "12", "--dry-run",
                                              f"run_dir={tmp_path / 'run'}"]))
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("restarts,status,requeues", [(0, "requeued", True), (1, "requeue-limit", False)])
def test_notice_outside_training_is_recorded_in_the_job_file(tmp_path, monkeypatch, restarts, status, requeues):
    """A notice that lands before train() installs its handler reaches submitit's checkpoint(): nothing to save,
    but the attempt is recorded, so the job file's history has every requeue."""
    run = tmp_path / "run"
    monkeypatch.setenv("SLURM_RESTART_COUNT", str(restarts))
    monkeypatch.setenv("SLURM_JOB_ID", "77")
    monkeypatch.setenv("SLURM_PROCID", "0")
    job = TrainJob(None, [f"run_dir={run}", "optim.warmup_steps=0"], max_requeues=1)
    delayed = job.checkpoint()
    assert (delayed is not None) == requeues
    info = json.loads((run / "slurm_job.json").read_text())
    assert info["attempts"] == [{**info["attempts"][0], "job_id": "77", "restarts": restarts, "status": status,
                                 "step": None, "outside_training": True}]
    monkeypatch.setenv("SLURM_PROCID", "1")  # other ranks leave the record to rank 0
    job.checkpoint()
    assert len(json.loads((run / "slurm_job.json").read_text())["attempts"]) == 1


@pytest.mark.parametrize("requested,restarts,made,expected", [
    (None, 0, False, "latest"), (None, 2, False, "latest"), ("latest", 0, False, "latest"),
    ("/old/run/checkpoints/step-00000300", 0, False, "/old/run/checkpoints/step-00000300"),  # issue 20: was latest
    ("/old/run/checkpoints/step-00000300", 1, True, "latest"),  # loaded by an earlier attempt: continue that line
    ("/old/run/checkpoints/step-00000300", 1, False, "/old/run/checkpoints/step-00000300"),  # not loaded yet
])
def test_an_explicit_resume_holds_until_an_attempt_loaded_it_then_a_requeue_takes_latest(requested, restarts, made,
                                                                                          expected):
    assert attempt_resume(requested, restarts, made) == expected


def test_restart_count_tells_the_attempts_apart():
    assert restart_count({}) == 0 and restart_count({"SLURM_RESTART_COUNT": "2"}) == 2
    assert restart_count({"SLURM_RESTART_COUNT": ""}) == 0 and restart_count({"SLURM_RESTART_COUNT": "x"}) == 0


def _fake_checkpoint(path: Path, complete: bool = True) -> Path:
    from vkd_dist import checkpoint

    path.mkdir(parents=True)
    (path / checkpoint.STATE_FILE).write_text("{}")
    (path / "model.bin").write_bytes(b"weights")
    if complete:
        checkpoint.write_manifest(path)
    return path


def _job_attempt(tmp_path, monkeypatch, overrides: list[str], restarts: int, preempted: bool = False,
                 max_requeues: int = 5):
    """TrainJob on one task, without a cluster or training: the `resume` it trains with, its slurm_job.json, and
    what it raised (None)."""
    import signal
    import types

    import submitit

    import vkd_dist.slurm as slurm
    import vkd_dist.train
    from vkd_dist import checkpoint

    run = tmp_path / "run"
    monkeypatch.setenv("SLURM_RESTART_COUNT", str(restarts))
    monkeypatch.setattr(slurm, "_stop_request", lambda: types.SimpleNamespace(signals=[signal.SIGUSR2]))
    monkeypatch.setattr(submitit, "JobEnvironment", lambda: types.SimpleNamespace(cluster="slurm", job_id="42"))
    monkeypatch.setattr(slurm, "export_distributed_env", lambda *_: {"RANK": "0", "WORLD_SIZE": "1",
                                                                      "MASTER_ADDR": "host", "MASTER_PORT": "1"})
    monkeypatch.setattr(signal, "signal", lambda *_: None)  # the job ignores late notices: not in pytest
    hashed: list = []
    monkeypatch.setattr(checkpoint, "_sha256", lambda path: hashed.append(path) or "0")
    seen = []

    def train(cfg, stop):
        seen.append((cfg.resume, list(hashed)))
        return types.SimpleNamespace(step=30, preempted=preempted, val=None, test=None, run_dir=str(run),
                                     checkpoints=[], resumed_from="the checkpoint train() verified")

    monkeypatch.setattr(vkd_dist.train, "train", train)
    error = None
    try:
        TrainJob(None, [f"run_dir={run}", "optim.warmup_steps=0", *overrides], max_requeues=max_requeues)()
    except RuntimeError as exc:
        error = str(exc)
    return seen, json.loads((run / "slurm_job.json").read_text()), error


@pytest.mark.parametrize("restarts,explicit,trains_with", [(0, True, "explicit"), (1, True, "latest"),
                                                          (0, False, "latest")])
def test_the_job_resumes_as_asked_and_leaves_the_hashing_to_training(tmp_path, monkeypatch, restarts, explicit,
                                                                     trains_with):
    """The run has a good step-10 and a newer step-20 whose save never finished. The first attempt trains from an
    explicit resume=PATH; a requeue after an attempt loaded it (RUN/resumed.json), or a job without one, from
    'latest'. Rank 0 used to verify the checkpoint alone before training (hashing every file, so the ranks'
    shared hashing in train() found it cached and never ran): nothing is hashed before train(), which records
    what it loaded."""
    run = tmp_path / "run"
    _fake_checkpoint(run / "checkpoints" / "step-00000010")
    _fake_checkpoint(run / "checkpoints" / "step-00000020", complete=False)
    other = _fake_checkpoint(tmp_path / "other" / "checkpoints" / "step-00000007")
    if restarts:
        (run / "resumed.json").write_text(json.dumps({"asked": str(other), "slurm_job": "42"}))
    seen, record, _ = _job_attempt(tmp_path, monkeypatch, [f"resume={other}"] if explicit else [], restarts)
    assert seen == [(str(other) if trains_with == "explicit" else "latest", [])]
    assert record["attempts"][0]["resume"] == seen[0][0]
    assert record["attempts"][1]["status"] == "completed"
    assert record["attempts"][1]["resumed_from"] == "the checkpoint train() verified"


def test_a_requeue_before_the_rollback_was_made_keeps_it_and_the_limit_says_how_to_continue(tmp_path, monkeypatch):
    """resume=RUN/checkpoints/step-200 in a run with step-400, preempted before an attempt loaded step-200 (and set
    step-400 aside): the requeue used to take 'latest' (step-400), the rollback lost without a word. The
    requeue-limit message said "resubmit to continue", but the job's command pins resume=PATH and rolls back."""
    run = tmp_path / "run"
    back = _fake_checkpoint(run / "checkpoints" / "step-00000200")
    _fake_checkpoint(run / "checkpoints" / "step-00000400")
    (run / "resumed.json").write_text(json.dumps({"asked": str(back), "slurm_job": "41"}))  # another job's
    seen, _, _ = _job_attempt(tmp_path, monkeypatch, [f"resume={back}"], restarts=1)
    assert [resume for resume, _ in seen] == [str(back)]
    seen, record, error = _job_attempt(tmp_path, monkeypatch, [f"resume={back}"], restarts=1, preempted=True,
                                       max_requeues=1)
    assert record["attempts"][-1]["status"] == "requeue-limit"
    assert error.endswith(f"checkpoint kept: resubmit the same vkd-slurm command with resume=latest in place of "
                          f"resume={back} (which would roll back to it again) to continue from the newest checkpoint")


def test_dry_run_command_keeps_an_explicit_resume(tmp_path):
    ckpt = _fake_checkpoint(tmp_path / "old" / "checkpoints" / "step-00000003")
    spec = spec_from_args(build_parser().parse_args(["--dry-run", f"run_dir={tmp_path / 'run'}", f"resume={ckpt}"]))
    command = training_command(spec)
    assert spec.resume == str(ckpt) and f"resume={ckpt}" in command and "resume=latest" not in command.split("\n")[1]
    assert "a requeued attempt with resume=latest" in command


# ----------------------------------------------------------------------------------------- real cluster
@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    if os.geteuid() != 0:
        pytest.skip("the loopback SLURM cluster needs root (slurmd runs jobs as any user)")
    try:
        ensure_installed()
    except ClusterUnavailable as exc:
        pytest.skip(str(exc))
    c = LoopbackCluster(tmp_path_factory.mktemp("slurm"), nodes=2, cpus_per_node=2)
    try:
        c.start()
    except ClusterUnavailable as exc:
        c.stop()
        pytest.skip(f"could not start the loopback SLURM cluster: {exc}")
    yield c
    c.stop()


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    from vkd_dist.configure import load_config
    from vkd_dist.data.schema import read_dataset
    from vkd_dist.data.synthetic import build_synthetic
    from vkd_dist.prepare import resolve_tokenizer

    root = tmp_path_factory.mktemp("data")
    out = root / "synthetic"
    build_synthetic(out, 64, 32, 32, image_size=64, progress=False)
    # Built here, in one process: vkd_dist.models.encoders.report_texts reads the shards with a WebDataset that has
    # no nodesplitter, which webdataset refuses when WORLD_SIZE > 1 (see the issue note); a prepared tokenizer
    # (model.tokenizer=DIR) is also what a multi-node run should use anyway.
    cfg = load_config(None, [f"run_dir={root / 'tok'}", *tiny(out, 1)])
    resolve_tokenizer(cfg, read_dataset(out))
    TOKENIZER.append(str(root / "tok" / "tokenizer"))
    return out


def launcher_env(cluster: LoopbackCluster) -> dict:
    env = cluster.env()
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1",
               PYTHONPATH=str(REPO))
    return env


def launch(cluster, *args: str, timeout: float = 150) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(LAUNCHER), *args], capture_output=True, text=True,
                          env=launcher_env(cluster), timeout=timeout, cwd=str(REPO))


def job_id_of(stdout: str) -> str:
    for line in stdout.splitlines():
        if line.startswith("submitted job "):
            return line.split()[2]
    raise AssertionError(f"no job id in launcher output:\n{stdout}")


@pytest.mark.slurm
def test_slurm_two_node_gloo_training(cluster, dataset, tmp_path):
    run = tmp_path / "run"
    t0 = time.time()
    proc = launch(cluster, "--nodes", "2", "--cpu", "--time", "10", "--wait", "--wait-timeout", "120",
                  f"run_dir={run}", *tiny(dataset, steps=6, ckpt_every=3))
    assert proc.returncode == 0, f"{proc.stdout}\n{proc.stderr}\n{cluster.log_tail('slurmctld')}"
    job_id = job_id_of(proc.stdout)
    assert "final step 6" in proc.stdout and "test: macro AUROC" in proc.stdout
    assert sorted(p.name for p in (run / "checkpoints").glob("step-*")) == ["step-00000003", "step-00000006"]
    metrics = json.loads((run / "test_metrics.json").read_text())
    assert "macro_auroc" in metrics
    assert list((run / "tensorboard").glob("events.*"))
    log0 = (run / "submitit" / f"{job_id}_0_log.out").read_text()
    assert "world 2" in log0 and "2 process(es)" in log0
    assert (run / "submitit" / f"{job_id}_1_log.out").is_file()  # the second node's task
    info = json.loads((run / "slurm_job.json").read_text())
    assert info["status"] == "completed" and info["restarts"] == 0
    print(f"2-node job {job_id} took {time.time() - t0:.1f}s")


@pytest.mark.slurm
@pytest.mark.slow  # ~70 s on 2 cores: two DeepSpeed processes importing and starting up
def test_slurm_deepspeed_two_tasks_per_node(cluster, dataset, tmp_path):
    """Two tasks on one node under DeepSpeed ZeRO-2 (the layout issue 13 is about, on CPUs): both ranks train,
    keep the local rank SLURM gave them, and end with the same parameters."""
    run = tmp_path / "run"
    t0 = time.time()
    proc = launch(cluster, "--tasks-per-node", "2", "--cpu", "--strategy", "deepspeed_zero2", "--time", "10",
                  "--wait", "--wait-timeout", "150", f"run_dir={run}", *tiny(dataset, steps=4, ckpt_every=2),
                  timeout=180)
    assert proc.returncode == 0, f"{proc.stdout}\n{proc.stderr}\n{cluster.log_tail('slurmctld')}"
    job_id = job_id_of(proc.stdout)
    assert "final step 4" in proc.stdout
    meta = json.loads((run / "final" / "meta.json").read_text())
    assert meta["step"] == 4 and len(meta["param_digests"]) == 2 and len(set(meta["param_digests"])) == 1
    for task in (0, 1):
        log = (run / "submitit" / f"{job_id}_{task}_log.out").read_text()
        assert f"task RANK={task} LOCAL_RANK={task} CUDA_VISIBLE_DEVICES= -> cpu" in log, log[-2000:]
    assert "strategy deepspeed_zero2" in (run / "submitit" / f"{job_id}_0_log.out").read_text()
    print(f"DeepSpeed 2-task job {job_id} took {time.time() - t0:.1f}s")


@pytest.mark.slurm
def test_slurm_preempted_job_requeues_and_resumes(cluster, dataset, tmp_path):
    run = tmp_path / "run"
    steps = 120
    t0 = time.time()
    proc = subprocess.Popen([sys.executable, str(LAUNCHER), "--nodes", "2", "--cpu", "--time", "10",
                             "--max-requeues", "2", "--wait", "--wait-timeout", "420", f"run_dir={run}",
                             *tiny(dataset, steps=steps, ckpt_every=5)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=launcher_env(cluster),
                            cwd=str(REPO))
    try:
        job_id, signalled, released = None, False, False
        deadline = time.time() + 400  # generous: a loaded CI machine runs the tiny job slowly
        while proc.poll() is None and time.time() < deadline:
            time.sleep(0.5)
            if job_id is None:
                job_id = submitted_job_id(run)
                continue
            if not signalled and list((run / "checkpoints").glob("step-*")):
                # the preemption notice, to every task of the job (what --signal=USR2@T sends before the limit)
                cluster.run(["scancel", "--signal=USR2", job_id])
                signalled = True
            if signalled and not released:
                released = release_requeued(cluster, job_id)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert signalled and released, f"signalled={signalled} released={released}\n{out}\n{err}"
    assert proc.returncode == 0, f"{out}\n{err}"
    assert f"final step {steps}" in out and "requeues 1" in out
    log0 = (run / "submitit" / f"{job_id}_0_log.out").read_text()
    assert "stop requested: checkpointed at step" in log0
    assert f"requeued job {job_id}" in log0
    assert "resumed from" in log0 and str(run / "checkpoints") in log0
    stopped = int(log0.split("stop requested: checkpointed at step")[1].split(";")[0])
    assert 5 <= stopped < steps
    info = json.loads((run / "slurm_job.json").read_text())
    assert info["status"] == "completed" and info["restarts"] == 1
    assert [a["status"] for a in info["attempts"]] == ["running", "requeued", "running", "completed"]
    assert (run / "checkpoints" / f"step-{steps:08d}").is_dir() and (run / "test_metrics.json").is_file()
    # the same run directory throughout: one config.yaml, one tensorboard dir, and nothing written elsewhere
    assert (run / "config.yaml").is_file()
    print(f"preempted at step {stopped}; whole job took {time.time() - t0:.1f}s")


@pytest.mark.slurm
def test_slurm_crashing_job_is_reported_failed(cluster, dataset, tmp_path):
    run = tmp_path / "run"
    t0 = time.time()
    # fails at run time on every rank: the config validates (the weights file exists) but it holds no weights
    weights = tmp_path / "not_weights_xyz.safetensors"
    weights.write_bytes(b"these are not weights")
    proc = launch(cluster, "--nodes", "2", "--cpu", "--time", "10", "--wait", "--wait-timeout", "90",
                  f"run_dir={run}", *tiny(dataset, steps=4), f"model.image_weights={weights}")
    elapsed = time.time() - t0
    assert proc.returncode == 1, f"{proc.stdout}\n{proc.stderr}"
    assert "FAILED" in proc.stderr and "not_weights_xyz.safetensors: cannot be loaded" in proc.stderr
    assert elapsed < 90
    job_id = job_id_of(proc.stdout)
    deadline = time.time() + 30
    while "JobState=FAILED" not in (state := cluster.run(["scontrol", "show", "job", "-o", job_id]).stdout):
        assert time.time() < deadline, state
        time.sleep(0.5)


@pytest.mark.slurm
def test_slurm_time_limit_checkpoints_requeues_and_bounds_requeues(cluster, dataset, tmp_path):
    """--time 1 with --signal-delay-s 12: SLURM sends USR2 ahead of the limit; the job checkpoints and requeues
    once (--max-requeues 1); the second time limit ends it with a reported failure, checkpoint kept.
    slurmctld checks limits every 30 s and signals up to 30 s early, so USR2 lands 18-48 s into each attempt:
    after training has started (a delay of 45 s let it land during start-up, before any step)."""
    run = tmp_path / "run"
    t0 = time.time()
    proc = subprocess.Popen([sys.executable, str(LAUNCHER), "--nodes", "2", "--cpu", "--time", "1",
                             "--signal-delay-s", "12", "--max-requeues", "1", "--wait", "--wait-timeout", "200",
                             f"run_dir={run}", *tiny(dataset, steps=100000, ckpt_every=50)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=launcher_env(cluster),
                            cwd=str(REPO))
    try:
        job_id, released = None, False
        deadline = time.time() + 220
        while proc.poll() is None and time.time() < deadline:
            time.sleep(0.5)
            if job_id is None:
                job_id = submitted_job_id(run)
                continue
            if not released:
                released = release_requeued(cluster, job_id)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 1, f"{out}\n{err}"
    assert "max_requeues=1" in err, err
    info = json.loads((run / "slurm_job.json").read_text())
    assert [a["status"] for a in info["attempts"]] == ["running", "requeued", "running", "requeue-limit"], info
    first, second = info["attempts"][1]["step"], info["attempts"][3]["step"]
    assert 0 < first < second
    assert (run / "checkpoints" / f"step-{second:08d}").is_dir()
    print(f"time limit: checkpoints at steps {first} and {second}; {time.time() - t0:.1f}s")


@pytest.mark.distributed
def test_slurm_launcher_local_cluster_two_tasks(dataset, tmp_path):
    """--cluster local: the same TrainJob under submitit's LocalExecutor (2 gloo ranks on this machine)."""
    run = tmp_path / "run"
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, str(LAUNCHER), "--cluster", "local", "--tasks-per-node", "2", "--cpu",
                           "--time", "5", "--wait", "--wait-timeout", "150", f"run_dir={run}",
                           *tiny(dataset, steps=4, ckpt_every=2)], capture_output=True, text=True, env=env,
                          timeout=180, cwd=str(REPO))
    assert proc.returncode == 0, f"{proc.stdout}\n{proc.stderr}"
    assert "final step 4" in proc.stdout and (run / "test_metrics.json").is_file()
    assert (run / "checkpoints" / "step-00000004").is_dir()
    assert "2 process(es)" in next((run / "submitit").glob("*_0_log.out")).read_text()
