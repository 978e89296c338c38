"""User mistakes at the entry points end in one `error: …` line on stderr and exit status 2 (in-process)."""
import pytest

from clover_jax import eval as eval_cli
from clover_jax import prepare
from clover_jax.convert.__main__ import main as convert_main


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "Traceback" not in err[0], err
    return err[0]


@pytest.mark.parametrize("argv, expected", [
    (["--format", "msvd", "--annotations", "/nonexistent/captions.json", "--media", "/tmp", "--out", "/tmp/x"],
     "--annotations /nonexistent/captions.json does not exist"),
    (["--format", "msvd", "--annotations", __file__, "--media", "/nonexistent", "--out", "/tmp/x"],
     "--media /nonexistent is not a folder"),
    (["--format", "nope", "--out", "/tmp/x"], "invalid choice: 'nope'"),
    (["--format", "qa", "--annotations", __file__, "--media", "/tmp", "--out", "/tmp/x"],
     "--format qa needs --qa-source"),
])
def test_prepare_mistakes(capsys, argv, expected):
    with pytest.raises(SystemExit) as info:
        code = prepare.main(argv)
        raise SystemExit(code)
    assert info.value.code == 2
    assert expected in _one_error_line(capsys)


def test_prepare_wrong_file_format_is_one_line(tmp_path, capsys):
    bad = tmp_path / "captions.json"
    bad.write_text("[1, 2, 3]")  # a list, where MSVD captions are an object
    assert prepare.main(["--format", "msvd", "--annotations", str(bad), "--media", str(tmp_path),
                         "--out", str(tmp_path / "out")]) == 2
    assert "captions_msvd.json" in _one_error_line(capsys)


@pytest.mark.parametrize("argv, expected", [
    (["--source", "official_clover", "--out", "/tmp/x"], "needs --checkpoint"),
    (["--source", "official_clover", "--checkpoint", "/nonexistent.pth", "--out", "/tmp/x"], "does not exist"),
    (["--source", "official_clover", "--checkpoint", __file__, "--out", "/tmp/x"], "not a safetensors file"),
    (["--source", "hf_bert", "--checkpoint", "/nonexistent", "--out", "/tmp/x"], "needs --checkpoint=<HF folder"),
    (["--source", "official_clover", "--checkpoint", __file__, "--model-overrides", "[1]", "--out", "/tmp/x"],
     "must be a JSON object"),
])
def test_convert_mistakes(capsys, argv, expected):
    with pytest.raises(SystemExit) as info:
        raise SystemExit(convert_main(argv))
    assert info.value.code == 2
    assert expected in _one_error_line(capsys)


def test_eval_without_workdir_is_one_line(capsys):
    with pytest.raises(SystemExit) as info:
        eval_cli.main([])
    assert info.value.code == 2
    assert "--workdir" in _one_error_line(capsys)


@pytest.fixture
def saved_run(tmp_path):
    """A workdir holding only the config.json of a `pretrain.py:tiny` run (no checkpoint)."""
    from clover_jax.checkpoint import write_json
    from clover_jax.run_setup import load_config_file

    write_json(tmp_path / "config.json", load_config_file("configs/pretrain.py:tiny").to_dict())
    return tmp_path


@pytest.mark.parametrize("argv, expected", [
    (["--evaluator=recall"], "--evaluator=recall: the run's config has no such evaluator; valid: msrvtt_mc, retrieval"),
    (["--checkpoint=newest"], "--checkpoint=newest: expected best, latest, a step number or a checkpoint folder"),
    (["--checkpoint=12"], "holds no step 12"),
    (["--checkpoint=best"], "holds no best checkpoint"),
    (["--config.evals.retrieval.every_step=3"], "the config has no key 'evals.retrieval.every_step'"),
    (["--config.eval.batch_size=eight"], "--config.eval.batch_size=eight: invalid literal"),
    (["--bogus"], "unrecognized arguments: --bogus"),
])
def test_eval_mistakes_are_one_line(saved_run, capsys, argv, expected):
    with pytest.raises(SystemExit) as info:
        code = eval_cli.main([f"--workdir={saved_run}", *argv])
        raise SystemExit(code)
    assert info.value.code == 2
    assert expected in _one_error_line(capsys)
