"""benchmarks/run_quality.sh keeps to the test-set protocol: its FINAL section simulates fresh sets and
evaluates each reported checkpoint on its task's set once; the final seeds are used nowhere else."""

import re
import shlex
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "run_quality.sh"
MARK = "# ============================================================ FINAL"


def _commands(text: str) -> list[list[str]]:
    out = []
    for line in text.splitlines():
        line = line.split(" # ")[0].strip()  # trailing comments
        if line and not line.startswith("#"):
            out.append(shlex.split(line))
    return out


def _option(words: list[str], name: str) -> str:
    return words[words.index(name) + 1]


def _sections():
    text = SCRIPT.read_text()
    assert text.count(MARK) == 1, "run_quality.sh must have one FINAL marker line"
    dev, final = text.split(MARK)
    return _commands(dev), _commands(final)


def test_final_section_evaluates_only_its_own_sets_once_per_checkpoint():
    dev, final = _sections()
    sims = {w[1]: _option(w, "--seed") for w in final if w[0] == "sim"}
    evals = [w for w in final if w[:2] == ["$C", "evaluate"]]
    assert len(sims) >= 5 and len(evals) >= len(sims)
    seen = set()
    for w in evals:
        data, ckpt = _option(w, "--data"), _option(w, "--ckpt")
        assert data in sims, f"final evaluate of {ckpt} on {data}, not a set simulated in FINAL"
        assert (data, ckpt) not in seen, f"{data} evaluated twice with {ckpt}"
        assert "--force" not in w, "a final evaluation must not overwrite an earlier one"
        seen.add((data, ckpt))
    assert all(d in {x for x, _ in seen} for d in sims), "a final set that nothing is evaluated on"
    # nothing is fitted, calibrated or resumed once the final sets exist
    assert not [w for w in final if w[:2] in (["$C", "fit"], ["$C", "calibrate"])]
    # development evaluations never touch a final set
    dev_data = {_option(w, "--data") for w in dev if w[:2] == ["$C", "evaluate"]}
    assert not dev_data & set(sims)


def test_final_seeds_are_fresh():
    dev, final = _sections()
    final_seeds = {_option(w, "--seed") for w in final if w[0] == "sim"}
    dev_seeds = {_option(w, "--seed") for w in dev if "--seed" in w}
    assert final_seeds and not final_seeds & dev_seeds
    assert len(final_seeds) == len([w for w in final if w[0] == "sim"]), "one seed per final set"
    others = [p for d in ("configs", "benchmarks", "tests") for p in (ROOT / d).rglob("*")
              if p.is_file() and p.suffix in {".yaml", ".yml", ".py", ".sh", ".md", ".json"}
              and p not in (SCRIPT, Path(__file__).resolve())] + [ROOT / "README.md"]
    for seed in final_seeds:
        pat = re.compile(rf"(?<![\d.]){seed}(?![\d.])")
        used = [str(p.relative_to(ROOT)) for p in others if p.exists() and pat.search(p.read_text(errors="ignore"))]
        assert not used, f"final seed {seed} also appears in {used}"
        # and in no other simulate line of the script
        assert sum(1 for w in dev + final if w[0] == "sim" and _option(w, "--seed") == seed) == 1


def test_protocol_header_is_stated():
    head = SCRIPT.read_text().split("set -euo")[0].lower()
    assert "frozen before" in head and "never used to choose" in head and "exactly once" in head
