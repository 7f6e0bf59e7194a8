from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import pytest

from sweeps.baselines import QLORA_RECIPE, calibrated_point
from sweeps.config import CONFIG_DIR, ConfigError, SweepConfig, load_config, validate_config
from sweeps.space import DEFAULT_SPACE, check_space, resolve_space, to_tune_space
from trainable.search_space import parse_space

LR = 1.32e-3  # SmolLM2-135M's calibrated learning rate (sweeps.baselines)


def calibrated(config: SweepConfig, learning_rate: float = LR) -> SweepConfig:
    """The config as the driver's plan makes it once the model's calibrated rate is known."""
    return validate_config(dataclasses.asdict(config), calibrated_lr=learning_rate)


def points(config: SweepConfig, learning_rate: float = LR) -> list[dict]:
    return [p.values for p in config.starting_points(learning_rate)]


CONFIGS = sorted(CONFIG_DIR.glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_every_bundled_config_loads_and_starts_with_its_command(path: Path) -> None:
    config = load_config(str(path))
    assert config.name == path.stem
    first_line = path.read_text().splitlines()[0]
    assert first_line.startswith("# python -m sweeps.run --config " + path.stem)
    assert points(config), "every bundled sweep evaluates a known point first"


def test_local_is_the_default_and_a_single_trial() -> None:
    config = load_config()
    assert config.model.name_or_path == "smollm2"
    assert config.search.num_samples == 1
    assert config.model.quantization == "nf4" and config.model.double_quant


def test_llama2_config_starts_with_the_baselines() -> None:
    config = load_config("llama2-7b")
    assert points(config, 2.86e-4) == [QLORA_RECIPE, calibrated_point(2.86e-4)]
    assert config.search.gpus_per_trial == 1


def test_the_learning_rate_range_is_centred_on_the_calibrated_rate() -> None:
    """The default space's bounds are written relative to the model's rate; the plan turns them into numbers,
    and a bound of another form, or relative bounds on another parameter, are refused by name."""
    config = load_config("local")
    assert config.search.space["learning_rate"] == {"loguniform": ["calibrated / 10", "calibrated * 10"]}
    assert calibrated(config).search.space["learning_rate"] == {"loguniform": [1.32e-4, 1.32e-2]}
    assert calibrated(config, 2.86e-4).search.space["learning_rate"] == {"loguniform": [2.86e-5, 2.86e-3]}
    space, problems = resolve_space({"learning_rate": {"uniform": ["calibrated", 1e-2]}}, 2e-3)
    assert space == {"learning_rate": {"uniform": [2e-3, 1e-2]}} and problems == []
    with pytest.raises(
        ConfigError, match=r"search\.space\.learning_rate\.loguniform: 'calibrated x 2' is not a number"
    ):
        load_config("local", ["search.space.learning_rate.loguniform=[1e-5, calibrated x 2]"])
    with pytest.raises(
        ConfigError, match=r"search\.space\.lora_dropout\.uniform: \[0, 'calibrated'\]: only learning_rate"
    ):
        load_config("local", ["search.space.lora_dropout={uniform: [0, calibrated]}"])
    with pytest.raises(
        ConfigError,
        match=r"search\.space\.learning_rate: value 1\.32: Input should be less than or equal to 1",
    ):
        calibrated(
            load_config("local", ["search.space.learning_rate.loguniform=[calibrated, calibrated * 1000]"])
        )


def test_cost_settings_default_to_auto_packing_and_no_price_or_budget() -> None:
    search = load_config("local", ["search.trials_per_gpu=3"]).search
    assert search.trials_per_gpu == 3
    search = load_config("local").search
    assert (search.trials_per_gpu, search.price_per_gpu_hour, search.budget_gpu_hours) == ("auto", None, None)


def test_dotted_overrides_are_typed() -> None:
    config = load_config(
        "local",
        [
            "train.max_steps=50",
            "search.space.r.choice=[8, 16]",
            "search.baselines=[]",
            "lora.learning_rate=1e-4",
        ],
    )
    assert config.train.max_steps == 50
    assert config.search.space["r"] == {"choice": [8, 16]}
    assert config.search.space["lora_alpha"] == DEFAULT_SPACE["lora_alpha"]
    assert config.lora.learning_rate == pytest.approx(1e-4)


@pytest.mark.parametrize(
    ("override", "named"),
    [
        ("train.max_stepz=5", "train.max_stepz"),
        ("lora.r=0", "lora.r"),
        ("model.quantization=int3", "model.quantization"),
        ("search.space.rank.choice=[8]", "search.space.rank"),
        ("search.space.r.choice=[0, 8]", "search.space.r"),
        ("search.space.learning_rate.loguniform=[0, 1e-3]", "search.space.learning_rate"),
        ("train.eval_every=1000", "train.eval_every"),
        ("search.scheduler=asha", "search.scheduler"),
        ("data.max_length=2", "data.max_length"),
        ("search.initial_points=[{r: 12}]", "search.initial_points[0].r"),
        ("storage_path=s3://b/x?endpoint_override=localhost:9000", "AWS_ENDPOINT_URL"),
        ("search.trials_per_gpu=0", "search.trials_per_gpu"),
        ("search.trials_per_gpu=some", "search.trials_per_gpu"),
        ("search.budget_gpu_hours=0", "search.budget_gpu_hours"),
        ("search.price_per_gpu_hour=-1", "search.price_per_gpu_hour"),
        ("search.gpu_memory_gib=0", "search.gpu_memory_gib"),
    ],
)
def test_bad_values_fail_naming_the_key(override: str, named: str) -> None:
    overrides = [override, "search.baselines=[]"] if "initial" in override else [override]
    with pytest.raises(ConfigError) as err:
        load_config("local", overrides)
    assert named in str(err.value)


def test_all_problems_are_reported_at_once() -> None:
    with pytest.raises(ConfigError) as err:
        load_config("local", ["lora.r=0", "lora.lora_dropout=2", "train.batch_size=0"])
    message = str(err.value)
    assert "3 problem(s)" in message
    assert all(key in message for key in ("lora.r", "lora.lora_dropout", "train.batch_size"))


def test_unknown_config_name_lists_the_known_ones() -> None:
    with pytest.raises(ConfigError, match="local"):
        load_config("no-such-sweep")


def test_override_needs_key_and_value() -> None:
    with pytest.raises(ConfigError, match="key=value"):
        load_config("local", ["train.max_steps"])


def test_a_bad_user_point_is_named_by_its_own_index_after_the_baselines() -> None:
    overrides = ["search.baselines=[qlora, calibrated]", "search.num_samples=4"]
    points = "search.initial_points=[{r: 16, lora_alpha: 32}, {r: 12}]"
    with pytest.raises(ConfigError) as err:
        load_config("local", [*overrides, points])
    assert "search.initial_points[1].r: 12 lies outside search.space.r" in str(err.value)
    with pytest.raises(ConfigError) as err:
        load_config("local", [*overrides, "search.initial_points=[{r: 12}]"])
    assert "search.initial_points[0].r" in str(err.value) and "initial_points[1]" not in str(err.value)


def test_a_baseline_outside_the_space_is_named_as_the_baseline() -> None:
    with pytest.raises(
        ConfigError, match=r"search\.baselines: qlora \(the QLoRA recipe's r\): 64 lies outside"
    ):
        load_config("local", ["search.baselines=[qlora]", "search.space.r.choice=[8, 16]"])
    narrow = load_config("local", ["search.space.learning_rate.loguniform=[1e-4, 1e-3]"])  # 1.32e-3 outside
    with pytest.raises(
        ConfigError,
        match=r"search\.baselines: calibrated \(the calibrated default's "
        r"learning_rate\): 0\.00132 lies outside search\.space\.learning_rate",
    ):
        calibrated(narrow)
    with pytest.raises(ConfigError, match=r"search\.start_with_qlora_recipe: replaced by search\.baselines"):
        load_config("local", ["search.start_with_qlora_recipe=false"])


def test_points_that_cannot_all_run_are_an_error_not_dropped() -> None:
    both = ["search.baselines=[qlora, calibrated]", "search.num_samples=1"]
    with pytest.raises(
        ConfigError,
        match=r"search.initial_points: 2 baseline\(s\) and 0 point\(s\) need "
        r"search.num_samples >= 2, got 1; .* \(or baselines\)",
    ):
        load_config("local", both)
    config = load_config("local", [*both[:1], "search.num_samples=2"])
    assert points(config) == [QLORA_RECIPE, calibrated_point(LR)]
    assert [p.baseline for p in config.starting_points(LR)] == ["qlora", "calibrated"]
    assert math.isnan(points(config, None)[1]["learning_rate"])  # not known before the model is
    with pytest.raises(ConfigError, match=r"search\.num_samples >= 4, got 2"):
        load_config("local", ["search.num_samples=2", "search.initial_points=[{r: 8}, {r: 16}, {r: 32}]"])


def test_default_space_is_valid_and_holds_the_baselines() -> None:
    for learning_rate in (1.32e-3, 2.86e-4):  # SmolLM2-135M's and Llama-2-7B's calibrated rates
        space, problems = resolve_space(DEFAULT_SPACE, learning_rate)
        assert problems == [] and check_space(space) == []
        assert set(to_tune_space(space)) == set(DEFAULT_SPACE)
        for baseline in (QLORA_RECIPE, calibrated_point(learning_rate)):
            assert set(baseline) <= set(DEFAULT_SPACE)  # the baseline's trial is the whole baseline
            assert all(parse_space(space)[name].contains(value) for name, value in baseline.items())


def test_lora_options_are_searchable_and_checked() -> None:
    space = "search.space.{}={}"
    config = load_config(
        "local",
        [
            space.format("use_dora", "{choice: [false, true]}"),
            space.format("use_rslora", "{choice: [true]}"),
            "lora.use_rslora=true",
            space.format("loraplus_lr_ratio", "{loguniform: [1, 16]}"),
        ],
    )
    assert set(to_tune_space(calibrated(config).search.space)) >= {
        "use_dora",
        "use_rslora",
        "loraplus_lr_ratio",
    }
    with pytest.raises(
        ConfigError, match=r"search\.space\.loraplus_lr_ratio: value 0\.5: .*greater than or equal to 1"
    ):
        load_config("local", [space.format("loraplus_lr_ratio", "{uniform: [0.5, 4]}")])
    with pytest.raises(ConfigError, match=r"lora\.loraplus_lr_ratio"):
        load_config("local", ["lora.loraplus_lr_ratio=0.5"])


def test_a_point_that_leaves_out_searched_keys_takes_the_lora_sections_values() -> None:
    """Tune's searcher needs a value for every searched key in every point (it raises once Ray has
    started otherwise): a left-out key gets the value trials use when it is not searched."""
    from sweeps.search import build_searcher

    dora = "search.space.use_dora={choice: [false, true]}"
    config = load_config(
        "local",
        [
            "search.num_samples=3",
            dora,
            "lora.use_dora=true",
            "search.initial_points=[{r: 8}]",
            "search.baselines=[qlora]",
        ],
    )
    config = calibrated(config)
    recipe, point = points(config)
    assert recipe == {**{k: v for k, v in QLORA_RECIPE.items() if k in config.search.space}, "use_dora": True}
    lora = config.lora
    assert point == {
        "r": 8,
        "learning_rate": lora.learning_rate,
        "lora_alpha": lora.lora_alpha,
        "target_modules": lora.target_modules,
        "lora_dropout": lora.lora_dropout,
        "use_dora": True,
    }
    searcher = build_searcher(config.search, points(config))
    searcher.set_search_properties("eval_loss", "min", to_tune_space(config.search.space))
    assert [searcher.suggest(f"t{i}") for i in range(2)] == [recipe, point]

    with pytest.raises(ConfigError) as err:
        load_config("local", ["search.initial_points=[{r: 8}]", "search.num_samples=2", "lora.lora_alpha=64"])
    assert (
        "search.initial_points[0].lora_alpha: left out, so lora.lora_alpha (64), which lies outside "
        "search.space.lora_alpha; give lora_alpha in the point or set lora.lora_alpha" in str(err.value)
    )


def test_auto_baselines_are_both_for_a_sweep_and_the_calibrated_default_for_one_trial() -> None:
    """A config that sets nothing validates: a single trial is the calibrated default, a sweep of several
    runs both baselines first; an explicit list is taken as given."""
    assert validate_config({"name": "x"}).baseline_names == ["calibrated"]
    assert points(validate_config({"name": "x"})) == [calibrated_point(LR)]
    assert validate_config({"name": "x", "search": {"num_samples": 2}}).baseline_names == [
        "qlora",
        "calibrated",
    ]
    assert validate_config(
        {"name": "x", "search": {"baselines": ["qlora"], "num_samples": 3}}
    ).baseline_names == ["qlora"]
