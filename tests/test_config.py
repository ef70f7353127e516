import os

import pytest

from pipeline import cli
from pipeline.config import ConfigError, from_dict
from pipeline.stages.encode import EncodeConfig


def test_unknown_option_is_named():
    with pytest.raises(ConfigError, match="unknown option 'resolutoin'"):
        from_dict(EncodeConfig, {"input": "a", "output": "b", "vae": "c", "resolutoin": 64})


def test_invalid_values_are_named():
    with pytest.raises(ConfigError, match="'resolution'"):
        from_dict(EncodeConfig, {"input": "a", "output": "b", "vae": "c", "resolution": "big"})
    with pytest.raises(ConfigError, match="'precision'"):
        from_dict(EncodeConfig, {"input": "a", "output": "b", "vae": "c", "precision": "fp8"})
    with pytest.raises(ConfigError, match="'vae' is required"):
        from_dict(EncodeConfig, {"input": "a", "output": "b"})
    with pytest.raises(ConfigError, match="unknown task 'upscale3'"):
        from_dict(EncodeConfig, {"input": "a", "output": "b", "vae": "c", "tasks": "upscale3"})


def test_yaml_then_flags_precedence(tmp_path):
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("encode:\n  input: in/*.tar\n  output: out\n  vae: v\n  resolution: 128\n  batch_size: 8\n")
    args = cli.build_parser().parse_args(
        ["encode", "--config", str(cfg_file), "--resolution", "64", "--tasks", "upscale2,restore", "--overwrite"]
    )
    from pipeline.config import from_args

    cfg = from_args(EncodeConfig, args, section="encode")
    # relative local paths are resolved on the driver (Ray workers run in another folder)
    assert (cfg.resolution, cfg.batch_size, cfg.input) == (64, 8, os.path.abspath("in/*.tar"))
    assert cfg.tasks == ["upscale2", "restore"] and cfg.overwrite is True


def test_cli_reports_bad_option_cleanly(capsys):
    assert cli.main(["encode", "--input", "x", "--output", "y", "--vae", "z", "--precision", "fp8"]) == 2
    assert "precision" in capsys.readouterr().err


def test_storage_options_never_echoed(capsys):
    rc = cli.main(["encode", "--input", "x", "--output", "y", "--vae", "z", "--storage-options", "{not json SECRETKEY"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "storage-options" in err and "SECRETKEY" not in err
