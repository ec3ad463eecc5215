"""Issue 28: `deepthink tune --method ct_kv | lora | lora_icl | ia3 | prefix | prompt | cpt` saves what `deepthink eval`
compared (the method's own training and step choice), and `predict` / `generate` / `serve` answer with it as the
method's own scorer did in-process; a peft baseline's adapter is saved in peft's own format."""
import json
import shutil
import sys
from pathlib import Path

import pytest
import torch

import deepthink
from deepthink import TunedContext, api
from deepthink.cli import main
from deepthink.context_schema import ContextError, check_meta, json_sha256
from deepthink.methods import Setup, make_method
from conftest import tiny_lm

peft = pytest.importorskip("peft")       # the `peft` extra; installed by make venv (requirements-lm-eval.txt)

DEMO_TEST = Path(deepthink.__file__).parent / "demo_data" / "sentiment_test.jsonl"
ROWS = [json.loads(line) for line in DEMO_TEST.read_text().splitlines()][:6]
OPTIONS = {"ct_kv": {"epochs": 3, "record_every": 1}, "lora": {"steps": 2, "lr": 0.05},
           "lora_icl": {"steps": 2, "lr": 0.05}, "ia3": {"steps": 2, "lr": 0.1}, "prefix": {"steps": 2, "lr": 0.1},
           "prompt": {"steps": 2, "lr": 0.1}, "cpt": {"steps": 2, "lr": 0.1}}
IN_MODEL = {"lora": "LORA", "lora_icl": "LORA", "ia3": "IA3"}


def run(capsys, *argv):
    capsys.readouterr()
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def error(capsys, *argv):
    code, out, err = run(capsys, *argv)
    assert code == 2, (out, err)
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"deepthink {argv[0]}: error: ") and "Traceback" not in err, err
    return last


def tune_args(model_dir, name, out, *extra):
    opts = [a for k, v in OPTIONS[name].items() for a in ("-o", f"{k}={v}")]
    return ["tune", "--model", model_dir, "--task", "sentiment-demo", "--shots", 1, "--method", name, *opts,
            "--quiet", "--out", out, *extra]


def own_scores(name, queries, choices):
    """The method's own scorer right after its own training (what `deepthink eval` scores with), on the tiny Llama
    the model folder was saved from, with the demonstrations `tune` draws and no dev items (the last step)."""
    inputs = api.resolve(None, task="sentiment-demo", method=name, shots=1, dev_size=0)
    setup = Setup(tiny_lm("llama"), inputs.text, [], demos=inputs.items)
    prepared = make_method(name, OPTIONS[name]).prepare(setup)
    return prepared.scorer.score(queries, choices), prepared.info


@pytest.fixture(scope="module")
def saved(tiny_model_dir, tmp_path_factory):
    """name -> a context `deepthink tune --method name --dev-size 0` saved (the last step: a trained adapter)."""
    root = tmp_path_factory.mktemp("methods")
    out = {}
    for name in OPTIONS:
        assert main([str(a) for a in tune_args(tiny_model_dir, name, root / name, "--dev-size", 0)]) == 0
        out[name] = root / name
    return out


def close(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x == pytest.approx(y, rel=1e-5, abs=1e-6)


# ---------------------------------------------------------------- tune -> save -> load -> predict

@pytest.mark.parametrize("name", list(OPTIONS))
def test_a_saved_method_predicts_as_its_own_scorer(name, saved, tmp_path, capsys):
    path = saved[name]
    meta = json.loads((path / "context.json").read_text())
    method = meta["method"]
    assert method["name"] == name and meta["tuning"] is None
    assert {k: method["options"][k] for k in OPTIONS[name]} == OPTIONS[name]       # every option, as set
    assert meta["task"]["name"] == "sentiment-demo" and meta["origin"] == {"task": "sentiment-demo", "seed": 0,
                                                                           "shots": 1}
    sel = method["selection"]
    assert sel["rule"] == "last" and sel["dev_items"] == 0
    queries = [f"Review: {r['sentence']}\nSentiment:" for r in ROWS]
    want, info = own_scores(name, queries, [" negative", " positive"])
    if name == "ct_kv":
        assert sel["chosen_epoch"] == info["chosen_epoch"] == 3 and meta["steps_done"] == sel["chosen_steps"] == 4
        assert len(sel["train_loss"]) == 3 and "adapter" not in meta and not (path / "adapter").exists()
        assert meta["demonstrations"] and meta["format_version"] == 2
    else:
        assert sel["chosen_steps"] == meta["steps_done"] == info["chosen_step"] == 2
        assert sel["train_loss"] == pytest.approx(info["train_loss"], rel=1e-5)
        assert meta["format_version"] == 3 and meta["adapter"]["in_model"] is (name in IN_MODEL)
        assert {p.name for p in (path / "adapter").iterdir()} >= {"adapter_config.json", "adapter_model.safetensors"}
        config = json.loads((path / "adapter" / "adapter_config.json").read_text())
        assert config["peft_type"] == IN_MODEL.get(name, {"prefix": "PREFIX_TUNING", "prompt": "PROMPT_TUNING",
                                                          "cpt": "CPT"}.get(name))
        assert meta["demonstrations"] == ("" if name in ("lora", "ia3", "prefix", "prompt", "cpt")
                                          else api.resolve(None, task="sentiment-demo", shots=1).text)
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    code, out, err = run(capsys, "predict", "--context", path, "--input", tmp_path / "rows.jsonl")   # a fresh load
    assert code == 0, err
    rows = [json.loads(line) for line in out.splitlines()]
    assert [r["query"] for r in rows] == queries
    assert [r["prediction"] for r in rows] == want.predictions()
    for r, w in zip(rows, want.logprob):
        close(r["logprob"], w)
    code, out, err = run(capsys, "generate", "--context", path, "--prompt", "Review: witty\nSentiment:",
                         "--max-new-tokens", 3)
    assert code == 0, err


def test_the_adapter_is_peft_s_own_and_generate_matches_the_library(saved, tiny_model_dir, capsys):
    """The saved LoRA loads with peft's own PeftModel.from_pretrained, and the model it gives scores as the loaded
    context does; `deepthink generate` continues as the library's loaded context does."""
    path = saved["lora"]
    lm = deepthink.load_model(str(tiny_model_dir))
    ctx = TunedContext.load(path, lm)             # puts the adapter into lm.model
    assert ctx.adapter is not None and ctx.adapter.in_model
    base = deepthink.load_model(str(tiny_model_dir))
    model = peft.PeftModel.from_pretrained(base.model, str(path / "adapter"))
    ids = torch.tensor([base.tokenizer("Review: witty\nSentiment: positive").input_ids])
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, lm.model(ids).logits, rtol=1e-5, atol=1e-6)
        assert not torch.allclose(model.get_base_model()(ids).logits,
                                  deepthink.load_model(str(tiny_model_dir)).model(ids).logits, atol=1e-4)
    code, out, err = run(capsys, "generate", "--context", path, "--prompt", "Review: witty\nSentiment:",
                         "--max-new-tokens", 4, "--no-stop-at-eos")
    assert code == 0, err
    assert out == ctx.generate("Review: witty\nSentiment:", 4, stop_at_eos=False) + "\n"


def test_library_tune_returns_what_the_cli_saves(saved, tiny_model_dir, tmp_path):
    """deepthink.tune(..., method="lora") answers with the adapted model before saving; saved and loaded for a
    fresh model it answers the same; a loaded context saves again with its adapter."""
    lm = deepthink.load_model(str(tiny_model_dir))
    ctx = deepthink.tune(lm, deepthink.get_task("sentiment-demo"), method="lora", dev_size=0, **OPTIONS["lora"])
    assert ctx.method["selection"]["chosen_steps"] == 2 and ctx.adapter.in_model
    queries = ["Review: witty and gorgeous\nSentiment:", "Review: boilerplate\nSentiment:"]
    before = ctx.predict(queries, [" negative", " positive"])
    with pytest.raises(ValueError, match="already holds a peft adapter"):       # a second adapter: refused
        deepthink.tune(lm, deepthink.get_task("sentiment-demo"), method="ia3", dev_size=0, steps=1)
    again = TunedContext.load(saved["lora"], deepthink.load_model(str(tiny_model_dir)))
    for a, b in zip(before, again.predict(queries, [" negative", " positive"])):
        close(a["logprob"], b["logprob"])
    copy = again.save(tmp_path / "copy")
    third = TunedContext.load(copy, deepthink.load_model(str(tiny_model_dir)))
    assert third.predict(queries, [" negative", " positive"]) == again.predict(queries, [" negative", " positive"])
    assert (copy / "adapter" / "adapter_model.safetensors").read_bytes() == \
        (saved["lora"] / "adapter" / "adapter_model.safetensors").read_bytes()


def test_ct_kv_with_dev_selection_records_its_curve(tiny_model_dir, tmp_path, capsys):
    code, out, err = run(capsys, *tune_args(tiny_model_dir, "ct_kv", tmp_path / "c", "-o", "selection=dev-acc",
                                            "--dev-size", 4))
    assert code == 0, err
    sel = json.loads((tmp_path / "c" / "context.json").read_text())["method"]["selection"]
    assert sel["rule"] == "dev-acc" and sel["dev_items"] == 4 and sel["dev_epochs"] == [0, 1, 2, 3]
    assert len(sel["accuracy_curve"]) == 4 and sel["chosen_steps"] == sel["chosen_epoch"] + 1
    assert f"ct_kv, epoch {sel['chosen_epoch']} of 3 chosen on 4 dev items" in out


def test_a_peft_method_without_dev_items_warns_and_keeps_the_last_step(tiny_model_dir, tmp_path, capsys):
    (tmp_path / "rows.jsonl").write_text(json.dumps(ROWS[0]) + "\n" + json.dumps(ROWS[1]) + "\n")   # no rows left
    code, out, err = run(capsys, "tune", "--model", tiny_model_dir, "--train", tmp_path / "rows.jsonl", "--template",
                         "Review: {sentence}\\nSentiment:", "--choices", "negative,positive", "--method", "prefix",
                         "-o", "prefix.steps=2", "--out", tmp_path / "p")
    assert code == 0, err
    assert "warning: no dev items" in err and "prefix keeps its last step" in err and "-o prefix.steps=N" in err
    assert "step 2 of 2: the last, no dev items" in out


# ---------------------------------------------------------------- refusals: one line, exit 2

def test_peft_missing_is_the_install_hint(saved, tiny_model_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "peft", None)          # `import peft` raises ImportError
    err = error(capsys, *tune_args(tiny_model_dir, "lora", tmp_path / "new"))
    assert "pip install 'deepthink[peft]'" in err and not (tmp_path / "new").exists()
    (tmp_path / "q.txt").write_text("Review: witty\n")
    with monkeypatch.context() as m:                         # ... said before any model loads
        m.setattr(deepthink.infer, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
        err = error(capsys, "predict", "--context", saved["lora"], "--choices", "a,b", "--input", tmp_path / "q.txt")
    assert "pip install 'deepthink[peft]'" in err
    from deepthink.integrations.serving import load_contexts

    with pytest.raises(ImportError, match=r"^context 'l': the peft baselines need the peft library: pip install"):
        load_contexts({"p": saved["prefix"], "l": saved["lora"]})
    # prefix tuning's context is an ordinary prefix cache: it needs no peft to answer
    code, _, err = run(capsys, "predict", "--context", saved["prefix"], "--choices", "a,b", "--input",
                       tmp_path / "q.txt")
    assert code == 0, err


def test_a_damaged_adapter_or_another_model_is_refused(saved, tmp_path, capsys):
    from conftest import tiny_lm as make

    (tmp_path / "q.txt").write_text("Review: witty\n")
    q = ["--choices", "a,b", "--input", tmp_path / "q.txt"]
    gone = tmp_path / "gone"
    shutil.copytree(saved["lora"], gone)
    (gone / "adapter" / "adapter_model.safetensors").unlink()
    err = error(capsys, "predict", "--context", gone, *q)
    assert "adapter_model.safetensors is missing: the context's peft adapter is incomplete" in err
    altered = tmp_path / "altered"
    shutil.copytree(saved["ia3"], altered)
    blob = bytearray((altered / "adapter" / "adapter_model.safetensors").read_bytes())
    blob[-1] ^= 1
    (altered / "adapter" / "adapter_model.safetensors").write_bytes(bytes(blob))
    err = error(capsys, "generate", "--context", altered, "--prompt", "x")
    assert "adapter_model.safetensors is altered or truncated" in err
    other = tmp_path / "other-llama"
    lm = make("llama", seed=1)
    lm.model.save_pretrained(other)
    lm.tokenizer.save_pretrained(other)
    err = error(capsys, "predict", "--context", saved["lora"], "--model", other, *q)
    assert "made for model" in err and "fingerprint" in err


def test_a_model_holding_an_adapter_serves_no_other_context(saved, tiny_model_dir):
    lm = deepthink.load_model(str(tiny_model_dir))
    TunedContext.load(saved["lora"], lm)
    for other in ("ct_kv", "ia3"):
        with pytest.raises(ValueError, match="already holds a peft adapter"):
            TunedContext.load(saved[other], lm)


def test_options_are_checked_before_the_model_loads(tiny_model_dir, tmp_path, capsys):
    out = ["--out", tmp_path / "x"]
    base = ["tune", "--model", tiny_model_dir, "--task", "sentiment-demo"]
    err = error(capsys, *base, "--method", "lora", "-o", "rank=4", *out)
    assert "has no option(s) ['rank']" in err and "'r'" in err
    assert "-o r=0: must be an integer >= 1" in error(capsys, *base, "--method", "lora", "-o", "r=0", *out)
    err = error(capsys, *base, "--method", "lora", "--lr", "0.1", *out)
    assert "--lr: option(s) of grad_kv / forward tuning, not of --method lora" in err and "-o lr=..." in err
    err = error(capsys, *base, "--method", "ct_kv", "--steps", "5", *out)
    assert "--steps" in err and "-o OPTION=VALUE" in err
    err = error(capsys, *base, "--method", "ct_kv", "-o", "lora.r=4", *out)
    assert "method 'lora' is not among" in err
    err = error(capsys, *base, "-o", "epochs=5", *out)
    assert "-o sets options of --method ct_kv and the peft baselines" in err
    err = error(capsys, *base, "--method", "ct_kv", "--dev-size", "8", *out)
    assert "reads no dev items" in err and "-o selection=dev-acc" in err
    assert "write METHOD.OPTION=VALUE" in error(capsys, *base, "--method", "ct_kv", "-o", "epochs", *out)
    assert not (tmp_path / "x").exists()


def test_overwrite_replaces_the_whole_folder(saved, tiny_model_dir, tmp_path, capsys):
    target = tmp_path / "ctx"
    shutil.copytree(saved["lora"], target)
    err = error(capsys, *tune_args(tiny_model_dir, "ct_kv", target))
    assert "already holds a tuned context: pass --overwrite" in err
    assert (target / "adapter").is_dir()
    code, _, err = run(capsys, *tune_args(tiny_model_dir, "ct_kv", target, "--overwrite"))
    assert code == 0, err
    assert json.loads((target / "context.json").read_text())["method"]["name"] == "ct_kv"
    assert not (target / "adapter").exists()                 # the lora context's adapter went with it


# ---------------------------------------------------------------- the schema and the server

def test_the_schema_ties_the_adapter_to_the_method(saved):
    meta = json.loads((saved["lora"] / "context.json").read_text())

    def refused(meta, match):
        meta["json_sha256"] = json_sha256(meta)
        with pytest.raises(ContextError, match=match):
            check_meta(meta, "context.json")

    refused({**meta, "adapter": {**meta["adapter"], "in_model": False}}, "adapter.in_model: False, but method lora "
                                                                         "needs its adapter in the model")
    refused({k: v for k, v in meta.items() if k != "adapter"}, r"lacks field\(s\) \['adapter'\]")
    grad = json.loads((saved["ct_kv"] / "context.json").read_text())
    refused({**grad, "format_version": 3, "adapter": meta["adapter"]}, "method ct_kv saves no peft adapter")
    refused({**meta, "adapter": {**meta["adapter"], "sha256": {"adapter_config.json": "0" * 64}}}, "lacks key")


def test_serve_gives_an_adapter_context_a_model_of_its_own(saved):
    pytest.importorskip("fastapi", reason="the serve extra is not installed: pip install 'deepthink[serve]'")
    from fastapi.testclient import TestClient

    from deepthink.integrations.server import ServeConfig, create_app
    from deepthink.integrations.serving import load_contexts

    contexts = load_contexts({"lora": saved["lora"], "ctkv": saved["ct_kv"], "prefix": saved["prefix"]})
    assert contexts["lora"].lm is not contexts["ctkv"].lm and contexts["ctkv"].lm is contexts["prefix"].lm
    queries, choices = ["Review: witty and gorgeous\nSentiment:"], [" negative", " positive"]
    with TestClient(create_app(contexts, ServeConfig())) as client:
        info = {c["name"]: c["method"] for c in client.get("/v1/contexts").json()}
        assert info == {"lora": "lora", "ctkv": "ct_kv", "prefix": "prefix"}
        for name in contexts:
            r = client.post("/v1/score", json={"context": name, "queries": queries, "choices": choices})
            assert r.status_code == 200, r.text
            want = TunedContext.load(saved[{"ctkv": "ct_kv"}.get(name, name)],
                                     deepthink.load_model(str(contexts[name].lm.source))).predict(queries, choices)
            close(r.json()["results"][0]["logprob"], want[0]["logprob"])
