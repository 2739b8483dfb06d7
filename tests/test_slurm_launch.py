"""What the SLURM launcher sends and prints, before anything is queued: a CPU-sized config is refused on GPU
nodes unless confirmed, and the printed training command names each key once."""

from vkd_dist.slurm import build_parser, main, spec_from_args, training_command


def test_a_cpu_sized_config_is_refused_on_gpu_nodes(tmp_path, capsys):
    run = f"run_dir={tmp_path / 'run'}"
    assert main(["--nodes", "3", "--dry-run", run]) == 2  # the embedded default: test_resnet, 0.37M parameters
    out = capsys.readouterr()
    assert out.out == "" and out.err.count("\n") == 1
    assert "refusing to send a CPU-sized config to 3 GPU node(s) x 1 GPU(s) for 1440 min" in out.err
    assert "test_resnet has 0.37M parameters" in out.err and "--allow-small-model" in out.err and "--cpu" in out.err
    assert main(["--nodes", "3", "--dry-run", "--allow-small-model", run]) == 0
    assert main(["--nodes", "3", "--dry-run", "--cpu", run]) == 0  # CPU nodes: what it is sized for
    assert main(["--nodes", "1", "--dry-run", run, "model.image_encoder=resnet18"]) == 0  # 11M: a GPU job
    assert not (tmp_path / "run").exists()


def test_the_printed_command_names_each_key_once(tmp_path, monkeypatch, tiny_data):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").symlink_to(tiny_data)
    spec = spec_from_args(build_parser().parse_args(["--dry-run", "run_dir=runs/x", "data.path=data",
                                                     "resume=latest", "train.max_steps=70"]))
    command = training_command(spec).splitlines()[-1]
    words = command.split()
    for key in ("run_dir", "data.path", "resume", "train.max_steps"):
        assert sum(w.startswith(f"{key}=") for w in words) == 1, (key, command)
    assert f"run_dir={tmp_path / 'runs' / 'x'}" in words and f"data.path={(tmp_path / 'data').resolve()}" in words
    assert "resume=latest" in words
    assert spec.overrides.count(f"run_dir={tmp_path / 'runs' / 'x'}") == 1  # the job gets them once too
