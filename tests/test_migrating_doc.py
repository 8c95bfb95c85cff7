"""docs/migrating.md stays honest: its diffalign keys exist, its values parse, its paths and anchors exist.

* Every backticked token in the diffalign column of a mapping table (the tables after a
  ``<!-- keys: trainer=NAME base=CONFIG -->`` marker) is a key of the run config or of trainer NAME's ``train``
  section, as ``diffalign config --help-keys trainer=NAME`` lists them, written bare or as ``key=value``.
* Each row's overrides, applied together on top of the marker's shipped config, build a valid ``RunConfig``
  through the project's own override parser and validation, and give the values the doc shows.
* Repository paths, ``file::test`` references, README anchors, the worked example's batch arithmetic and the
  copied reward example are checked against the tree.

Fast: no model loads (the trainers' config classes import torch, nothing more).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from diffalign.config import (
    RunConfig,
    apply_overrides,
    describe,
    from_dict,
    load_config,
    load_yaml,
    parse_override,
    to_dict,
    trainer_config_class,
)

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "migrating.md"
MARKER = re.compile(r"<!-- keys: trainer=(\w+) base=(\S+) -->")
KEY = re.compile(r"[a-z_][a-z0-9_]*(\.[a-z0-9_]+)*")


def _text() -> str:
    return DOC.read_text(encoding="utf-8")


def _split_row(line: str) -> list:
    """Cells of a markdown table row; a ``|`` inside backticks does not split."""
    cells, cur, code = [], "", False
    for ch in line.strip().strip("|"):
        if ch == "`":
            code = not code
        if ch == "|" and not code:
            cells.append(cur.strip())
            cur = ""
        else:
            cur += ch
    cells.append(cur.strip())
    return cells


def _tables() -> list:
    """``[(trainer, base, [(line_no, reference_cell, [tokens of the diffalign cell]), ...]), ...]``."""
    lines = _text().splitlines()
    out = []
    for i, line in enumerate(lines):
        m = MARKER.search(line)
        if not m:
            continue
        rows, j = [], i + 1
        while j < len(lines) and not lines[j].startswith("|"):
            j += 1
        header = j
        while j < len(lines) and lines[j].startswith("|"):
            if j > header + 1:  # skip the header and the separator
                cells = _split_row(lines[j])
                assert len(cells) == 3, f"docs/migrating.md:{j + 1}: expected 3 cells, got {len(cells)}"
                rows.append((j + 1, cells[0], re.findall(r"`([^`]*)`", cells[1])))
            j += 1
        out.append((m.group(1), m.group(2), rows))
    return out


def _valid_keys(trainer: str) -> set:
    """The keys ``diffalign config --help-keys trainer=NAME`` prints (first column of describe())."""
    text = describe(RunConfig) + "\n" + describe(trainer_config_class(trainer), "train")
    return {line.split()[0] for line in text.splitlines() if line and not line[0].isspace() and line[0] != "-"}


def _lookup(data, key: str):
    node = data
    for part in key.split("."):
        node = node[int(part)] if isinstance(node, list) else node[part]
    return node


def _as_override(key: str, value) -> str:
    import yaml

    return f"{key}={yaml.safe_dump(value, default_flow_style=True).strip().removesuffix('...').strip()}"


TABLES = _tables()


def test_the_doc_has_its_three_mapping_tables():
    assert [t for t, _, _ in TABLES] == ["grpo", "grpo", "nft"]
    assert all(len(rows) >= 10 for _, _, rows in TABLES)


@pytest.mark.parametrize("trainer, base, rows", TABLES, ids=["flow_grpo", "ddpo", "nft"])
def test_every_mapped_key_is_a_config_key_of_its_trainer(trainer, base, rows):
    assert load_yaml(ROOT / base)["trainer"] == trainer, f"{base} is not a {trainer} config"
    valid = _valid_keys(trainer)
    bad = []
    for line_no, ref, tokens in rows:
        for tok in tokens:
            key = tok.partition("=")[0]
            if not KEY.fullmatch(key) or re.sub(r"\.\d+(?=\.|$)", ".<i>", key) not in valid:
                bad.append(f"docs/migrating.md:{line_no} ({ref}): {tok!r}")
    assert not bad, "not a config key of trainer " + trainer + ":\n" + "\n".join(bad)


@pytest.mark.parametrize("trainer, base, rows", TABLES, ids=["flow_grpo", "ddpo", "nft"])
def test_each_rows_overrides_build_a_valid_config_with_the_shown_values(trainer, base, rows):
    raw = load_yaml(ROOT / base)
    defaults = to_dict(from_dict(RunConfig, raw))
    for line_no, ref, tokens in rows:
        if not tokens:
            continue
        overrides = [tok if "=" in tok else _as_override(tok, _lookup(defaults, tok)) for tok in tokens]
        where = f"docs/migrating.md:{line_no} ({ref}): {overrides}"
        try:
            cfg = to_dict(from_dict(RunConfig, apply_overrides(raw, overrides, RunConfig)))
        except Exception as exc:  # noqa: BLE001 - reported with the row
            pytest.fail(f"{where}: {type(exc).__name__}: {exc}")
        for tok in tokens:
            if "=" in tok:
                key, value = parse_override(tok)
                assert _lookup(cfg, key) == value, f"{where}: {key} resolved to {_lookup(cfg, key)!r}"


def test_a_misspelt_key_is_caught():
    """The checks above would fail on a typo: the help-keys lookup and the config parser both reject it."""
    assert "train.clip_range" in _valid_keys("grpo") and "train.clip_rnage" not in _valid_keys("grpo")
    assert "train.kl_weight" in _valid_keys("nft") and "train.kl_weight" not in _valid_keys("grpo")
    raw = load_yaml(ROOT / "configs/gpu/sd35m_geneval_flow_grpo.yaml")
    with pytest.raises(ValueError, match="clip_rnage"):
        from_dict(RunConfig, apply_overrides(raw, ["train.clip_rnage=1e-4"], RunConfig))
    with pytest.raises(ValueError, match="golbal_std"):
        apply_overrides(raw, ["sample.golbal_std=true"], RunConfig)


def _slug(heading: str) -> str:
    """GitHub's anchor of a markdown heading."""
    text = re.sub(r"[`*_\[\]()]", "", heading.strip().lower())
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def test_linked_files_and_anchors_exist():
    links = re.findall(r"\]\(([^)\s]+)\)", _text())
    assert links
    for link in links:
        target, _, anchor = link.partition("#")
        path = (DOC.parent / target).resolve()
        assert path.is_file(), f"link {link!r}: no file {path}"
        if anchor:
            slugs = {_slug(h) for h in re.findall(r"^#+ (.+)$", path.read_text(encoding="utf-8"), re.M)}
            assert anchor in slugs, f"link {link!r}: no heading with anchor #{anchor} in {target}"


def test_cited_repository_paths_and_tests_exist():
    text = _text()
    # tests/ and configs/ anywhere, and every path in the "shown by" column (which also names scripts/)
    cited = set(re.findall(r"`((?:tests|configs)/[\w./-]+(?:::\w+)?)`", text))
    section = text.split("## What behaves differently", 1)[1].split("\n## ", 1)[0]
    for line in section.splitlines():
        if line.startswith("|") and not line.startswith("|---"):
            cited.update(t for t in re.findall(r"`([^`]+)`", _split_row(line)[-1]) if "/" in t)
    assert len(cited) >= 15
    for ref in sorted(cited):
        path, _, test = ref.partition("::")
        exists = (ROOT / path).is_dir() if path.endswith("/") else (ROOT / path).is_file()
        assert exists, f"docs/migrating.md cites {path}, which does not exist"
        if test:
            source = (ROOT / path).read_text(encoding="utf-8")
            assert re.search(rf"^def {test}\(", source, re.M), f"{path} has no test {test}"


def _section(title: str) -> str:
    return _text().split(f"## {title}", 1)[1].split("\n## ", 1)[0]


def test_worked_example_batch_arithmetic():
    section = _section("Worked example")
    commands = [" ".join(c.split()).replace("\\ ", "")
                for c in re.findall(r"```bash\n(.*?)```", section, re.S)]
    assert len(commands) == 2
    for command in commands:
        words = command.split()
        processes = int(words[words.index("--num_processes") + 1])
        config = words[words.index("train") + 1]
        assert config == "configs/gpu/sd35m_geneval_flow_grpo.yaml"
        overrides = words[words.index("train") + 2:]
        cfg = load_config(RunConfig, ROOT / config, overrides)
        s, t = cfg.sample, cfg.train
        per_process = s.batch_size * s.num_batches_per_epoch
        assert processes * per_process == 1152
        assert processes * per_process // s.group_size == 48
        assert per_process % t["batch_size"] == 0
        assert per_process // t["batch_size"] // t["gradient_accumulation_steps"] == 2
        assert int(s.num_steps * t["timestep_fraction"]) == 9
        assert (t["learning_rate"], t["clip_range"], t["adv_clip_max"], t["beta"]) == (3e-4, 1e-4, 5.0, 0.04)
        assert (t["std_mode"], t["ema"], t["ema_every"], t["eval_every"]) == ("batch", True, 8, 60)
        assert (s.guidance_scale, s.noise_level, s.eval_num_steps, s.step) == (4.5, 0.7, 40, "flow_sde")
        assert (cfg.model.lora.rank, cfg.model.lora.alpha, cfg.model.dtype) == (32, 64.0, "float16")
        assert cfg.checkpoint.every == 60 and cfg.prompts.eval_size == 2212


def test_reward_example_is_copied_verbatim_from_the_rewards_readme():
    blocks = re.findall(r"```(?:python|yaml)\n.*?```", _section("Bringing your own reward"), re.S)
    assert len(blocks) == 2
    readme = (ROOT / "rewards" / "README.md").read_text(encoding="utf-8")
    for block in blocks:
        assert block in readme, f"not in rewards/README.md:\n{block}"
