"""One source of defaults: every config dataclass default equals what params.yaml says."""
from __future__ import annotations

import dataclasses

import yaml

from depthtune.config import Params, load_params, to_dict
from import_graph import ROOT


def _leaves(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(_leaves(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def test_code_defaults_equal_params_yaml():
    shipped = yaml.safe_load((ROOT / "params.yaml").read_text())
    shipped.pop("variants")  # the user's list, not a default
    written = _leaves({k: to_dict(getattr(load_params(ROOT / "params.yaml"), k)) for k in shipped})
    defaults = _leaves({k: to_dict(getattr(Params(), k)) for k in shipped})
    # every key params.yaml sets has the code's default value (parsed the same way: lists, floats)
    differ = {k: (defaults.get(k), v) for k, v in written.items() if defaults.get(k) != v}
    assert not differ, f"code default != params.yaml (key: (code, params.yaml)): {differ}"


def test_params_yaml_is_the_full_picture():
    """Every section and key of the config (but variants and optional sub-sections) is written in params.yaml."""
    shipped = yaml.safe_load((ROOT / "params.yaml").read_text())
    for f in dataclasses.fields(Params):
        assert f.name in shipped, f"params.yaml has no `{f.name}` section"
    missing = sorted(set(_leaves(to_dict(Params()))) - set(_leaves(shipped)) - {"variants"})
    assert not missing, f"keys with a default but absent from params.yaml: {missing}"
