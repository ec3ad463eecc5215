"""Units saved before an option existed resume and report with that option's default."""
from deepthink.evaluation import EvalConfig
from deepthink.evaluation.config import upgrade_config


def test_options_added_since_a_unit_was_written_take_their_defaults():
    now = EvalConfig(methods={"icl": {}, "dt_dev": {"steps": 4}}).to_dict()
    old = {**now, "methods": {k: dict(v) for k, v in now["methods"].items()}}
    for gone in ("target", "guard_level"):
        del old["methods"]["dt_dev"][gone]
    assert upgrade_config(old) == now
    unknown = {**now, "methods": {**now["methods"], "not_loaded_plugin": {"x": 1}}}
    assert upgrade_config(unknown)["methods"]["not_loaded_plugin"] == {"x": 1}
