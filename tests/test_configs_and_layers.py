"""Every YAML under configs/ composes and instantiates; the core imports only torch and numpy."""

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
POLICY_FILES = sorted(p.stem for p in (CONFIGS / "policy").glob("*.yaml"))


MODEL_FILES = sorted(p.stem for p in (CONFIGS / "model").glob("*.yaml"))
DATA_FILES = sorted(p.stem for p in (CONFIGS / "data").glob("*.yaml"))
NEEDS_PREPARE = {"doremi", "doremi_online"}  # their stages need data and models: covered in test_doremi_ado.py
REQUIRED = {"static": ["policy.weights={a: 0.75, b: 0.25}"]}  # settings a policy's config leaves to the command


@pytest.mark.parametrize("policy", POLICY_FILES)
def test_policy_configs_compose_and_instantiate(policy):
    with initialize_config_dir(config_dir=str(CONFIGS), version_base=None):
        cfg = compose(config_name="callback", overrides=[f"policy={policy}", *REQUIRED.get(policy, [])])
    cb = instantiate(cfg.callback, domains=["a", "b", "a"])
    if policy in NEEDS_PREPARE:
        assert callable(cb.policy.prepare)
        return
    cb.policy.bind(["a", "b"], [2, 1])
    w = cb.policy.initial_weights()
    assert abs(w.sum() - 1) < 1e-9


@pytest.mark.parametrize("model", MODEL_FILES)
@pytest.mark.parametrize("data", DATA_FILES)
def test_mixture_configs_compose_and_instantiate(model, data):
    with initialize_config_dir(config_dir=str(CONFIGS), version_base=None):
        for policy in POLICY_FILES:
            overrides = [f"policy={policy}", f"model={model}", f"data={data}", *REQUIRED.get(policy, [])]
            cfg = compose(config_name="mixture", overrides=overrides)
            assert instantiate(cfg.policy) is not None
    net = instantiate(cfg.model, seed=0)
    assert net.config.vocab_size == 257 and cfg.data.max_len <= net.config.max_position_embeddings


ROOT = Path(__file__).resolve().parents[1]
# Each layer: its source folder and the dataflex packages it may import. The core (``dataflex/*.py`` and
# ``dataflex.policies``) uses only itself; samplers build on the core; the proxies and the HF adapter on
# core + samplers; the test beds (models, data and measurement helpers for tests, demo and benchmarks)
# on core + samplers + proxies; recipes may use everything. ``dataflex/__init__.py`` is the facade that
# re-exports the HF callbacks lazily, so it is the one file allowed to name ``dataflex.hf``.
CORE = {"dataflex", "dataflex.policies"}
LAYERS = {
    "core": (["dataflex/*.py", "dataflex/policies/*.py"], CORE),
    "samplers": (["samplers/*.py"], CORE | {"dataflex.samplers"}),
    "testbeds": (["dataflex/testbeds/*.py"], CORE | {"dataflex.samplers", "dataflex.proxies", "dataflex.testbeds"}),
    "proxies": (["proxies/*.py"], CORE | {"dataflex.samplers", "dataflex.proxies"}),
    "hf": (["dataflex/hf/*.py"], CORE | {"dataflex.samplers", "dataflex.hf"}),
}
SUBPACKAGES = (
    "dataflex.policies",
    "dataflex.samplers",
    "dataflex.proxies",
    "dataflex.recipes",
    "dataflex.hf",
    "dataflex.testbeds",
)


def dataflex_imports(path: Path) -> set[str]:
    """Every dataflex module a file imports, at any depth (function-level imports included)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{a.name}" for a in node.names)
    return {n for n in names if n == "dataflex" or n.startswith("dataflex.")}


def package_of(module: str) -> str:
    return next((p for p in SUBPACKAGES if module == p or module.startswith(p + ".")), "dataflex")


def layer_violations() -> list[str]:
    bad = []
    for layer, (patterns, allowed) in LAYERS.items():
        for pattern in patterns:
            for path in sorted(ROOT.glob(pattern)):
                if path.relative_to(ROOT).as_posix() == "dataflex/__init__.py":
                    continue
                for module in sorted(dataflex_imports(path)):
                    if package_of(module) not in allowed:
                        bad.append(f"{path.relative_to(ROOT)} ({layer}) imports {module}")
    return bad


def test_every_layer_imports_only_the_layers_below_it():
    assert layer_violations() == []


def test_the_layer_walk_sees_function_level_imports(tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text("def f():\n    from dataflex.samplers.curriculum import CurriculumSampler\n")
    assert package_of(min(dataflex_imports(probe))) == "dataflex.samplers"


def test_core_imports_only_torch_and_numpy():
    core = sorted(f"dataflex.{p.stem}" for p in (ROOT / "dataflex").glob("*.py") if p.stem != "__init__")
    code = (
        f"import sys, dataflex.policies, {', '.join(core)}; "
        "bad = [m for m in ('transformers', 'accelerate', 'datasets', 'faiss', 'hydra', 'sklearn', 'wandb') "
        "if m in sys.modules]; print(bad); sys.exit(1 if bad else 0)"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_samplers_and_proxies_are_installed_in_the_dataflex_namespace():
    import dataflex.proxies
    import dataflex.samplers

    assert Path(dataflex.samplers.__file__).parent.name == "samplers"
    assert Path(dataflex.proxies.__file__).parent.name == "proxies"


def test_byte_tokenizer_encodes_text_as_its_utf8_bytes():
    from dataflex.testbeds.tiny import PAD_ID, byte_tokenizer, encode_bytes

    tok = byte_tokenizer()
    for text in [" answer 7", "héllo wörld — ✓", "tab\there\nnewline  two spaces"]:
        ids = tok(text)["input_ids"]
        assert ids == list(text.encode("utf-8")) == encode_bytes(text, 1000)[:-1]
        assert tok.decode(ids) == text
    assert tok.pad_token_id == tok.eos_token_id == PAD_ID


def test_jsonl_data_a_user_brings_is_read_whole_or_refused_naming_the_line(tmp_path):
    """Blank lines are skipped (a trailing empty line is common); a damaged line, a record that is not an
    object, a record without the text or the first record's fields, or a non-text text raises naming where."""
    import json

    from dataflex.testbeds.tiny import byte_dataset, instruct_dataset, load_jsonl_dir

    good = [{"text": "a", "domain": "x"}, {"text": "b", "domain": "x"}, {"text": "c", "domain": "x"}]
    (tmp_path / "x.jsonl").write_text(
        "\n".join(json.dumps(r) for r in good[:2]) + "\n\n" + json.dumps(good[2]) + "\n\n"
    )
    assert load_jsonl_dir(tmp_path) == good
    assert load_jsonl_dir(tmp_path, max_per_file=2) == good[:2]  # counts records, not lines
    assert byte_dataset(load_jsonl_dir(tmp_path), 16)["domain"] == ["x", "x", "x"]
    (tmp_path / "y.jsonl").write_text(json.dumps(good[0]) + '\n{"text": "cut off\n')
    with pytest.raises(ValueError, match=r"y\.jsonl:2 is not valid JSON"):
        load_jsonl_dir(tmp_path)
    (tmp_path / "y.jsonl").write_text('["text", "domain"]\n')
    with pytest.raises(ValueError, match=r"y\.jsonl:1 is a JSON list, not an object"):
        load_jsonl_dir(tmp_path)
    (tmp_path / "y.jsonl").write_bytes(b'{"text": "d", "domain": "x"}\n{"text": "\xff", "domain": "x"}\n')
    with pytest.raises(ValueError, match=r"y\.jsonl:2 is not UTF-8 text \(invalid start byte at byte 10\)"):
        load_jsonl_dir(tmp_path)
    (tmp_path / "y.jsonl").write_bytes(b"\xef\xbb\xbf" + json.dumps(good[0]).encode() + b"\r\n")  # BOM, CRLF
    assert load_jsonl_dir(tmp_path) == good + good[:1]
    # a corpus whose records carry no domain (the recipes' text layout needs one on every record): named by file
    # and line, where it ended in datasets' "Column 'domain' doesn't exist" from the evaluation check
    (tmp_path / "y.jsonl").write_text(json.dumps(good[0]) + "\n" + json.dumps({"text": "unlabelled"}) + "\n")
    with pytest.raises(ValueError, match=r"y\.jsonl:2 has no 'domain' field: every record here needs \['text', 'd"):
        load_jsonl_dir(tmp_path, require=("text", "domain"))
    with pytest.raises(ValueError, match=r"record 1 has no \['domain'\]"):
        byte_dataset([good[0], {"text": "no label"}], 16)
    with pytest.raises(ValueError, match=r"record 0 has no \['text'\]"):
        byte_dataset([{"content": "other key", "domain": "x"}], 16)
    with pytest.raises(ValueError, match="record 1's 'text' is int, not text"):
        byte_dataset([good[0], {"text": 7, "domain": "x"}], 16)
    with pytest.raises(ValueError, match=r"record 1 has no \['task'\]"):
        instruct_dataset(
            [{"instruction": "q", "response": "a", "task": "t"}, {"instruction": "q", "response": "a"}], 64
        )


def test_an_evaluation_split_that_would_make_a_wrong_table_is_caught_before_training():
    """A domain whose examples have no next-token target would be left out of the per-domain table (and so
    of its mean) without a word: refused, before training and by the evaluation itself. A domain absent from
    training is evaluated, with a warning naming it (a misspelt name looks the same), and a training domain
    without evaluation examples is named (the table's mean would leave it out). A label field holding
    1 and "1" is named, not left to Arrow's conversion error."""
    from dataflex.testbeds.tiny import byte_dataset, check_evaluation_split, per_domain_loss, tiny_gpt2

    train = byte_dataset([{"text": "alpha beta", "domain": "a"}, {"text": "gamma", "domain": "b"}], 16)
    empty_b = byte_dataset([{"text": "alpha", "domain": "a"}, {"text": "", "domain": "b"}], 16)
    with pytest.raises(ValueError, match=r"the validation split: domains \['b'\] have no token to score"):
        check_evaluation_split(train, empty_b)
    with pytest.raises(ValueError, match=r"domains \['b'\] have no token to score"):
        per_domain_loss(tiny_gpt2(), empty_b, empty_b["domain"])
    losses = per_domain_loss(tiny_gpt2(), train, train["domain"])
    assert sorted(losses) == ["a", "b"]
    other = byte_dataset([{"text": "alpha", "domain": "a"}, {"text": "zeta", "domain": "z"}], 16)
    with pytest.warns(UserWarning) as caught:
        check_evaluation_split(train, other, "test")
    said = [str(w.message) for w in caught]
    assert any(re.match(r"the test split has domains \['z'\] that no training example has", m) for m in said)
    # a training domain without test examples would be missing from the table's mean and worst domain
    assert any(re.match(r"training domains \['b'\] have no example in the test split: the per-domain", m) for m in said)
    with pytest.raises(ValueError, match=r"field 'domain' holds values of several types .*'int': 0, 'str': 1"):
        byte_dataset([{"text": "x", "domain": 1}, {"text": "y", "domain": "1"}], 16)
