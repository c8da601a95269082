"""The `dalle` command line: user errors name their cause, no stack trace."""

import subprocess
import sys

from orchestration.cli import main


def test_unknown_profile_is_a_one_line_error(capsys, tmp_path):
    assert main(["demo", "--profile", "huge", "--run-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "unknown profile 'huge'" in err and "Traceback" not in err


def test_crawl_missing_url_list(capsys, tmp_path):
    assert main(["crawl", str(tmp_path / "nope.parquet"), "--storage", str(tmp_path / "s")]) == 2
    assert "nope.parquet" in capsys.readouterr().err


def test_crawl_wrong_columns_names_the_column(capsys, tmp_path):
    bad = tmp_path / "list.csv"
    bad.write_text("link,text\nhttp://127.0.0.1:1/x,a red circle\n")
    assert main(["crawl", str(bad), "--storage", str(tmp_path / "s"), "--profile", "tiny"]) == 2
    err = capsys.readouterr().err
    assert "url" in err and "link" in err


def test_console_script_runs():
    out = subprocess.run([sys.executable, "-m", "orchestration.cli", "profiles"], capture_output=True, text=True, check=True)
    assert "paper-12B" in out.stdout


def test_plan_prints_the_paper_12b_figures(capsys):
    assert main(["plan", "--profile", "paper-12B", "--nodes", "16", "--gpus-per-node", "8", "--powersgd-rank", "112"]) == 0
    out = capsys.readouterr().out
    assert "12,293,828,224" in out and "83.3%" in out and "16 machines x 8 GPUs" in out  # embeddings, heads, gains, biases uncompressed (issue 13)


def test_plan_rejects_zero_gpus(capsys):
    assert main(["plan", "--gpus-per-node", "0"]) == 2
    assert "--gpus-per-node" in capsys.readouterr().err


def test_train_prior_multinode_needs_a_rendezvous(capsys):
    assert main(["train-prior", "--nnodes", "2", "--codes", "x", "--out", "y"]) == 2
    assert "--rdzv-endpoint" in capsys.readouterr().err


def test_unknown_option_is_refused_outside_train_prior():
    import pytest

    with pytest.raises(SystemExit):
        main(["profiles", "--bogus"])


def test_demo_world_serve_then_crawl_its_url_list(tmp_path):
    """`dalle demo-world serve` writes URL lists and serves them; `dalle crawl` fetches one."""
    import signal
    import time
    from pathlib import Path

    from services import free_port, wait_for_port

    port = free_port()
    dalle = str(Path(sys.executable).parent / "dalle")
    server = subprocess.Popen([dalle, "demo-world", "serve", "--profile", "tiny", "--port", str(port),
                               "--out", str(tmp_path / "world")], stdout=subprocess.PIPE, text=True)
    try:
        wait_for_port(port, timeout=60, proc=server)
        lists = sorted((tmp_path / "world" / "url_lists").iterdir())
        assert [p.suffix for p in lists] == [".parquet", ".csv"]
        assert (tmp_path / "world" / "coco_eval" / "captions.json").is_file()
        out = subprocess.run([dalle, "crawl", str(lists[0]), "--storage", str(tmp_path / "store"), "--profile", "tiny"],
                             capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr
        assert "crawled 120 rows" in out.stdout and "http_404" in out.stdout
        assert any((tmp_path / "store" / "raw_pairs" / "batch-000").glob("part-*.tar"))
    finally:
        server.send_signal(signal.SIGINT)
        server.wait(timeout=120)  # generous: CI machines are loaded


def test_s3_storage_without_credentials_stops_at_start_up(capsys, tmp_path, monkeypatch):
    for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("DALLE_STORAGE", "s3://some-bucket/runs")
    assert main(["demo", "--run-dir", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert "DALLE_STORAGE=s3://some-bucket/runs needs AWS credentials" in err and "AWS_ACCESS_KEY_ID" in err
    assert not (tmp_path / "run" / "dagster_home").exists()  # nothing started


def test_unknown_profile_from_the_environment_names_the_setting(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("DALLE_PROFILE", "paper-99B")
    assert main(["demo", "--run-dir", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert "paper-99B" in err and "DALLE_PROFILE" in err and "Traceback" not in err
