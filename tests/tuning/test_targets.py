"""target='rotation': the positional part of the update on rotary models (K_t = K~ rotated by L, V_t = V~)."""
import json

import pytest
import torch

import deepthink
from deepthink import TuningConfig
from deepthink import kv
from deepthink.tuning.targets import TARGETS, check_rotation, rotary_offsets, rotate_keys
from deepthink.tuning.config import TARGETS as CONFIG_TARGETS
from deepthink.context_schema import UnverifiedContextWarning
from conftest import CHOICES, DEMOS, QUERIES, as_format_1, tiny_lm

ROTARY = ["llama", "qwen2", "mistral", "gemma3"]


def keys_at(lm, ids, start):
    pos = torch.arange(start, start + ids.shape[1])[None]
    with torch.no_grad():
        return kv.encode(lm.model, ids, position_ids=pos)[0]


@pytest.mark.parametrize("arch", ROTARY)
def test_keys_rotated_by_L_are_the_keys_encoded_L_positions_later(arch):
    """Encode the demonstrations at 0..L-1 and, alone again, at L..2L-1: every layer's hidden inputs are the same
    (RoPE attention depends only on relative positions), so the pre-RoPE keys are too, and rotating the first
    keys by L gives the second (per layer type on Gemma-3: local and global bases differ)."""
    lm = tiny_lm(arch)
    ids = torch.tensor([lm.tokenizer(DEMOS).input_ids])
    L = ids.shape[1]
    at0, atL = keys_at(lm, ids, 0), keys_at(lm, ids, L)
    rotations = rotary_offsets(lm.model, L)
    assert len(rotations) == len(at0)
    for a, b, r in zip(at0, atL, rotations):
        assert not torch.allclose(a, b, atol=1e-3)                  # positions do change the keys
        assert torch.allclose(rotate_keys(a, *r), b, atol=1e-4, rtol=1e-4)
    if arch == "gemma3":                                            # two bases: the layers' rotations differ
        assert not torch.allclose(rotations[0][1], rotations[1][1])


def test_a_wrong_rotation_is_refused_by_the_check():
    lm = tiny_lm("llama")
    ids = torch.tensor([lm.tokenizer(DEMOS).input_ids])
    L = ids.shape[1]
    check_rotation(lm.model, ids, rotary_offsets(lm.model, L))
    with pytest.raises(ValueError, match="does not give the keys the model computes"):
        check_rotation(lm.model, ids, rotary_offsets(lm.model, L + 1))


@pytest.mark.parametrize("arch", ROTARY)
def test_rotation_with_zero_step_size_is_icl_and_values_never_move(arch):
    lm = tiny_lm(arch)
    icl = deepthink.tune(lm, DEMOS, TuningConfig(steps=1))
    still = deepthink.tune(lm, DEMOS, TuningConfig(steps=4, step_size=0.0, target="rotation"))
    assert all(torch.equal(x, y) for x, y in zip(icl.keys + icl.values, still.keys + still.values))
    assert still.score(QUERIES, CHOICES).logprob == icl.score(QUERIES, CHOICES).logprob
    moved = deepthink.tune(lm, DEMOS, TuningConfig(steps=3, step_size=0.3, momentum=0.5, target="rotation"))
    assert all(torch.equal(x, y) for x, y in zip(icl.values, moved.values))
    assert not any(torch.allclose(x, y) for x, y in zip(icl.keys, moved.keys))


def test_rotation_is_the_update_towards_the_rotated_keys():
    """One gate step (momentum 0): K~ = eta R_L K~ + (1 - eta) K~, with no forward pass over the demonstrations."""
    lm = tiny_lm("gemma3")
    icl = deepthink.tune(lm, DEMOS, TuningConfig(steps=1))
    L = icl.length
    ctx = deepthink.tune(lm, DEMOS, TuningConfig(steps=2, step_size=0.25, momentum=0.0, target="rotation"))
    for k0, k1, r in zip(icl.keys, ctx.keys, rotary_offsets(lm.model, L)):
        assert torch.allclose(k1, 0.25 * rotate_keys(k0, *r) + 0.75 * k0, atol=1e-6)


@pytest.mark.parametrize("rule", ["momentum", "normalized", "nesterov"])
def test_rotation_composes_with_rules_and_updates(rule):
    lm = tiny_lm("qwen2")
    icl = deepthink.tune(lm, DEMOS, TuningConfig(steps=1))
    for update in ("kv", "k", "v"):
        ctx = deepthink.tune(lm, DEMOS, TuningConfig(steps=3, step_size=0.1, rule=rule, update=update,
                                                     target="rotation"))
        assert all(torch.equal(x, y) for x, y in zip(icl.values, ctx.values))
        keys_same = all(torch.equal(x, y) for x, y in zip(icl.keys, ctx.keys))
        assert keys_same == (update == "v")
        assert ctx.stopped is None and all(torch.isfinite(k).all() for k in ctx.keys)


@pytest.mark.parametrize("arch, why", [("gpt2", "learned absolute position embeddings"),
                                       ("opt", "learned absolute position embeddings"),
                                       ("gpt_neo", "learned absolute position embeddings"),
                                       ("bloom", "ALiBi")])
def test_models_without_rotary_positions_are_refused_saying_why(arch, why):
    with pytest.raises(ValueError, match=f"needs rotary position embeddings.*{why}.*target='reencode'"):
        deepthink.tune(tiny_lm(arch), DEMOS, TuningConfig(steps=2, target="rotation"))
    with pytest.raises(ValueError, match="rotary"):        # refused even at T = 1: the control does not exist there
        deepthink.tune(tiny_lm(arch), DEMOS, TuningConfig(steps=1, target="rotation"))


def test_bad_targets_are_clear_errors():
    assert set(TARGETS) == set(CONFIG_TARGETS)
    with pytest.raises(ValueError, match="TuningConfig.target='nope': must be one of reencode, rotation"):
        TuningConfig(target="nope")
    with pytest.raises(ValueError, match="positions='aligned' there is no offset"):
        TuningConfig(target="rotation", positions="aligned")


def test_target_is_saved_and_old_artifacts_load_with_reencode(tmp_path):
    lm = tiny_lm("llama")
    ctx = deepthink.tune(lm, DEMOS, TuningConfig(steps=2, step_size=0.1, target="rotation"))
    ctx.save(tmp_path / "r")
    assert deepthink.TunedContext.read_config(tmp_path / "r")["tuning"]["target"] == "rotation"
    assert deepthink.TunedContext.load(tmp_path / "r", lm).config.target == "rotation"
    deepthink.tune(lm, DEMOS, TuningConfig(steps=2)).save(tmp_path / "old")
    path = tmp_path / "old" / "context.json"
    meta = as_format_1(json.loads(path.read_text()))
    del meta["tuning"]["target"]
    path.write_text(json.dumps(meta))
    with pytest.warns(UnverifiedContextWarning):
        assert deepthink.TunedContext.load(tmp_path / "old", lm).config.target == "reencode"


def test_the_tune_command_takes_target(tmp_path, tiny_model_dir, capsys):
    from deepthink.cli import main

    demos = tmp_path / "d.txt"
    demos.write_text(DEMOS)
    assert main(["tune", "--model", str(tiny_model_dir), "--demos", str(demos), "--steps", "2",
                 "--method", "forward", "--target", "rotation", "--out", str(tmp_path / "c")]) == 0
    assert json.loads((tmp_path / "c" / "context.json").read_text())["tuning"]["target"] == "rotation"
