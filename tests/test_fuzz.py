"""Random overrides of random config keys with random values of random types (issue 20, item 4).

The contract for every case: accepted, or one `error: ` line under 300 characters (in process: a UserError with
such a message), never another exception, never a traceback, never anything under logdir.

A bounded generator of our own with a fixed seed, not hypothesis: no new dependency, every case reproducible
from (seed, index) alone, no example database written into the tree, and the values are drawn from the schema's
own key list (alignprop/schema.py RULES), so a new key is fuzzed as soon as it has its rule.

In process, `jobs.prepare` (what main.py runs before the run directory exists) is the entry: "accepted" means
validation passed; nothing is trained. Through main.py each case also sets only_eval=True without a resume_from,
so a case that passes validation still stops with exit 2 before anything is written (a training run per case
would take minutes).

Size: ALIGNPROP_FUZZ_CASES (in-process cases, default 1000), ALIGNPROP_FUZZ_CLI_CASES (main.py runs, default 4,
~6 s each), ALIGNPROP_FUZZ_SEED (default 20). Nightly: ALIGNPROP_FUZZ_CASES=20000 ALIGNPROP_FUZZ_CLI_CASES=100.
"""

import math
import os
import random
import sys
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from test_main import fork_main  # noqa: E402
from test_schema import assert_cli_contract, assert_message_contract, override  # noqa: E402

from alignprop import jobs, schema  # noqa: E402
from alignprop.errors import UserError  # noqa: E402
from alignprop.presets import load_preset  # noqa: E402

CASES = int(os.environ.get("ALIGNPROP_FUZZ_CASES", "1000"))
CLI_CASES = int(os.environ.get("ALIGNPROP_FUZZ_CLI_CASES", "4"))
SEED = int(os.environ.get("ALIGNPROP_FUZZ_SEED", "20"))
PRESETS = ("tiny", "tiny", "tiny", "evaluate", "evaluate_soup", "aesthetic_k1")
KEYS = sorted(schema.RULES)
CLI_SKIPPED_KEYS = {"logdir", "only_eval", "soup_inference", "resume_from"}  # what keeps a CLI case from training

INTS = [0, 1, -1, 2, 3, 7, 1000, 1001, 2**31, 2**32, 2**63, 10**400, -(10**30)]
FLOATS = [math.nan, math.inf, -math.inf, 0.0, -0.0, 1e-320, 1e308, 0.5, 1.0, 1.5, -1.5, 2.0, 100.0, 101.0]
TEXTS = [
    "",
    " ",
    "x",
    "..",
    "../../..",
    "a/../../b.txt",
    "/etc/passwd",
    "/nonexistent/prompts.txt",
    "from_file:..",
    "a" * 200,
    "a" * 201,
    "/nonexistent/" + "d" * 183 + ".txt",
    "o" * 90 + "/" + "m" * 90,
    "a" * 100_000,
    "ünïcødé 🎨",
    "a\nb",
    "a\x00b",
    "\udc80",
    "\u2028",
    "nan",
    "1e999",
    "toyworld",
    "tiny",
    "stablediffusion",
    "aesthetic:1,toyworld_shape:x",
    "toyworld_shape:0.5",
    "a" * 64 + ":1",
    "0,0.5,1",
    "0,zero",
    "--config.seed=1",
    "%s%n{}",
]


def random_scalar(rng: random.Random):
    kind = rng.choice(["int", "float", "text", "bool", "none"])
    if kind == "int":
        return rng.choice(INTS) if rng.random() < 0.7 else rng.randint(-(10**6), 10**6)
    if kind == "float":
        return rng.choice(FLOATS) if rng.random() < 0.7 else rng.uniform(-10, 10)
    if kind == "text":
        return rng.choice(TEXTS)
    return rng.choice([True, False]) if kind == "bool" else None


def plausible_value(rng: random.Random, rule, default):
    """A value the key's rule is likely to accept, or one just past its edge: what reaches the later checks."""
    if isinstance(rule, schema.Flag):
        return rng.choice([True, False])
    if isinstance(rule, schema.Int):
        edges = [v for v in (rule.low, rule.high) if v is not None]
        return rng.choice([default + rng.randint(-2, 2), *edges, *(v + rng.choice([-1, 1]) for v in edges)])
    if isinstance(rule, schema.Number):
        edges = [v for v in (rule.low, rule.high) if v is not None]
        return rng.choice([default * rng.uniform(0, 2), *edges, *(v + rng.choice([-1e-9, 1e-9]) for v in edges)])
    if isinstance(rule, schema.Text) and rule.choices is not None:
        return rng.choice(rule.choices())
    if isinstance(rule, schema.Pair):
        return tuple(plausible_value(rng, rule.item, d) for d in (default if len(default) == 2 else (0, 1)))
    return default


def random_value(rng: random.Random, rule, default):
    """Half near what the key accepts (so that later checks are reached), half anything of any type."""
    roll = rng.random()
    if roll < 0.5:
        return plausible_value(rng, rule, default)
    if roll < 0.55 and isinstance(default, tuple | list):
        return tuple(rng.choice([*default, *INTS[:6], *FLOATS[:4]]) for _ in range(rng.randint(0, 3)))
    if roll < 0.65:
        return rng.choice([(), (1, 2), (2, 1), (0, 1, 2), ("a", "b"), (math.nan, 1), ((1, 2),), ("x" * 300,), [1, 2]])
    if roll < 0.67:
        return {"a": 1}
    return random_scalar(rng)


def fuzzed_config(rng: random.Random, logdir: Path):
    config = load_preset(rng.choice(PRESETS))
    config.logdir = str(logdir)
    if rng.random() < 0.8:
        config.pretrained.model = "tiny"  # the real models are not cached on CI: reach the checks after this one
        if config.only_eval and not config.soup_inference:
            config.resume_from = "stablediffusion"  # evaluate the base model: past the "needs resume_from" check
    changes = []
    for key in rng.sample(KEYS, rng.randint(1, 3)):
        parent = config
        for part in key.split(".")[:-1]:
            parent = parent[part]
        value = random_value(rng, schema.RULES[key], parent[key.split(".")[-1]])
        try:
            override(config, key, value, type_safe=rng.random() < 0.5)  # type-safe: what the flag parser allows
        except (TypeError, ValueError, KeyError, OverflowError):
            continue  # refused as --config.KEY=VALUE would be, by ml_collections' type check
        changes.append((key, value))
    return config, changes


def test_random_overrides_are_accepted_or_one_short_error_line(tmp_path):
    rng = random.Random(SEED)
    logdir = tmp_path / "logs"
    failures, outcomes = [], {"accepted": 0, "refused": 0}
    for index in range(CASES):
        config, changes = fuzzed_config(rng, logdir)
        try:
            jobs.prepare(config, 1)
            outcomes["accepted"] += 1
        except UserError as error:
            outcomes["refused"] += 1
            try:
                assert_message_contract(str(error))
            except AssertionError as problem:
                failures.append((index, changes, f"message: {problem}"))
        except Exception as error:  # the contract: nothing but UserError
            where = traceback.extract_tb(error.__traceback__)[-1]
            failures.append((index, changes, f"{type(error).__name__}: {error} at {where.filename}:{where.lineno}"))
        assert not logdir.exists(), (index, changes)
    report = "\n".join(f"case {i} {schema.excerpt(c, 300)}: {problem[:500]}" for i, c, problem in failures[:20])
    assert not failures, f"{len(failures)} of {CASES} cases broke the contract (seed {SEED}):\n{report}"
    assert outcomes["accepted"] and outcomes["refused"], outcomes  # the generator reaches both sides


CLI_VALUES = [
    "nan",
    "inf",
    "-inf",
    "-1",
    "0",
    "1e999",
    "99999999999999999999999",
    "9" * 400,
    "(0,1,2)",
    "()",
    "(1,)",
    "[1,2]",
    "True",
    "None",
    "''",
    "x" * 5000,
    "../..",
    "ü🎨",
    "0x10",
    "1_000",
    " ",
    "=",
    "(nan, 1)",
    "a,b",
]


def test_random_overrides_on_the_command_line(tmp_path):
    rng = random.Random(SEED + 1)
    keys = [key for key in KEYS if key not in CLI_SKIPPED_KEYS]
    for index in range(CLI_CASES):
        logdir = tmp_path / f"logs{index}"
        overrides = [f"--config.{key}={rng.choice(CLI_VALUES)}" for key in rng.sample(keys, rng.randint(1, 2))]
        base = ["--config", f"config/align_prop.py:{rng.choice(('tiny', 'evaluate'))}", f"--config.logdir={logdir}"]
        result = fork_main(*base, "--config.only_eval=True", "--config.resume_from=", *overrides)
        try:
            assert_cli_contract(result, logdir)
        except AssertionError as problem:
            raise AssertionError(f"case {index} {[o[:100] for o in overrides]}: {problem}") from None
