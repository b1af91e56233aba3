"""Real series written by the trainers' own saving code, during a few dozen steps of real training.

Each builder trains a tiny model with the library's own training loop or saving calls and returns a
``Series``: the folder the trainer wrote (what a user points ckpt-ema at), the true optimizer step of each
save (counted by the test, never by ckpt-ema) and the weights at that step, captured in the training loop.
The expected EMA is a per-step float64 loop over the linearly interpolated weights (spec §2), written
here without any ckpt-ema code.

Library versions these builders were written against (all installed from PyPI in the test extra):
transformers 5.24, accelerate 1.15, peft 0.21, diffusers 0.42, lightning 2.6, timm 1.0.31,
ema-pytorch 0.8.3, pytorch-posthoc-ema 1.0.10.

torchvision: PyPI's build needs a CUDA torch and cannot be imported here. timm imports it at module
level only for ``FrozenBatchNorm2d`` and its image transforms, none of which ``CheckpointSaver`` or the tiny
model uses, so :func:`stub_torchvision` puts an inert placeholder module in ``sys.modules`` before timm is
imported. timm's saving code (``timm.utils.CheckpointSaver``) then runs unchanged.
"""

from __future__ import annotations

import argparse
import importlib.machinery
import json
import sys
import types
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

State = dict[str, torch.Tensor]


@dataclass
class Series:
    """What a trainer wrote: ``root`` (the folder to point at), the true steps and weights at each save."""

    root: Path
    states: dict[int, State]  # true optimizer step -> weights at that step (as the model held them)
    init: State | None = None  # weights at step 0
    extra: dict[str, object] = field(default_factory=dict)

    @property
    def steps(self) -> list[int]:
        return sorted(self.states)


def snapshot(module: nn.Module, prefix: str = "") -> State:
    return {prefix + k: v.detach().clone() for k, v in module.state_dict().items()}


# ----------------------------------------------------------------------------------------------
# independent float64 references
# ----------------------------------------------------------------------------------------------


def ema64(states: Mapping[int, Mapping[str, torch.Tensor]], beta: float, names: Sequence[str] | None = None):
    """Classic EMA at the last step, float64: ema(s0) = theta(s0), then ema = b*ema + (1-b)*theta(t) for
    every step t, theta linear between the checkpoints. Float tensors only."""
    steps = sorted(states)
    last = states[steps[-1]]
    names = [n for n, t in last.items() if t.is_floating_point()] if names is None else list(names)
    result = {}
    for name in names:
        arrays = [states[s][name].double().numpy() for s in steps]
        ema = arrays[0].copy()
        for j in range(1, len(steps)):
            a, b, gap = arrays[j - 1], arrays[j], steps[j] - steps[j - 1]
            for k in range(1, gap + 1):
                ema = beta * ema + (1.0 - beta) * (a + (b - a) * (k / gap))
        result[name] = ema
    return result


def power_ema64(every_step: Sequence[Mapping[str, torch.Tensor]], gamma: float) -> dict[str, np.ndarray]:
    """EDM2 power EMA after the last of ``every_step`` (index t = weights after step t, t >= 1), float64:
    beta_t = (1 - 1/t)^(gamma+1)."""
    names = [n for n, t in every_step[-1].items() if t.is_floating_point()]
    ema = {n: np.zeros(every_step[-1][n].shape) for n in names}
    for t in range(1, len(every_step)):
        beta = (1.0 - 1.0 / t) ** (gamma + 1.0)
        for n in names:
            ema[n] = beta * ema[n] + (1.0 - beta) * every_step[t][n].double().numpy()
    return ema


def sigma_rel_to_gamma(sigma_rel: float) -> float:
    """Largest real root of g^3 + 7g^2 + (16 - s^-2)g + (12 - s^-2) = 0 (EDM2, spec §3)."""
    t = sigma_rel**-2
    roots = np.roots([1.0, 7.0, 16.0 - t, 12.0 - t])
    return float(max(r.real for r in roots if abs(r.imag) < 1e-9))


def max_rel(actual: Mapping[str, torch.Tensor], expected: Mapping[str, np.ndarray], strip: str = "") -> float:
    """Largest |a - e| / max|e| over the expected tensors (names in ``actual`` may lack ``strip``)."""
    worst = 0.0
    for name, want in expected.items():
        got = actual[name[len(strip) :] if strip and name.startswith(strip) else name].double().numpy()
        assert got.shape == want.shape, (name, got.shape, want.shape)
        worst = max(worst, float(np.abs(got - want).max()) / max(float(np.abs(want).max()), 1e-12))
    return worst


def first_share(steps: Sequence[int], beta: float) -> float:
    """The weight the first checkpoint keeps in the classic EMA with hold-free linear interpolation:
    computed by running ema64 on indicator 'weights'."""
    states = {s: {"x": torch.tensor([1.0 if i == 0 else 0.0], dtype=torch.float64)} for i, s in enumerate(steps)}
    return float(ema64(states, beta)["x"][0])


# ----------------------------------------------------------------------------------------------
# a tiny regression problem
# ----------------------------------------------------------------------------------------------


class Tiny(nn.Module):
    def __init__(self, width: int = 8) -> None:
        super().__init__()
        self.inp = nn.Linear(4, width)
        self.out = nn.Linear(width, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.tanh(self.inp(x)))


def batches(seed: int = 0, size: int = 16):
    """An endless stream of (x, y) batches of a fixed noisy regression task."""
    generator = torch.Generator().manual_seed(seed)
    mapping = torch.randn(4, 2, generator=generator)
    while True:
        x = torch.randn(size, 4, generator=generator)
        yield x, torch.tanh(x @ mapping) + 0.1 * torch.randn(size, 2, generator=generator)


# ----------------------------------------------------------------------------------------------
# hand-written loops: torch.save({"model": ..., "step": ..., "epoch": ...}, f"checkpoint_{epoch}.pt")
# ----------------------------------------------------------------------------------------------


def handwritten(root: Path, epochs: int = 4, steps_per_epoch: int = 10) -> Series:
    torch.manual_seed(0)
    model = Tiny()
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.02)
    data = batches(0)
    root.mkdir(parents=True)
    series = Series(root, {}, init=snapshot(model))
    step = 0
    for epoch in range(epochs):
        for _ in range(steps_per_epoch):
            x, y = next(data)
            loss = nn.functional.mse_loss(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            step += 1
        state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": step, "epoch": epoch}
        torch.save(state, root / f"checkpoint_{epoch}.pt")
        series.states[step] = snapshot(model)
    return series


# ----------------------------------------------------------------------------------------------
# accelerate: ProjectConfiguration(automatic_checkpoint_naming=True) + save_state()
# ----------------------------------------------------------------------------------------------


def accelerate_run(root: Path, steps: int = 30, every: int = 5, two_models: bool = True) -> Series:
    """``project_dir/checkpoints/checkpoint_{save index}/`` with ``model.safetensors`` (+ ``model_1``)."""
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration

    torch.manual_seed(1)
    model = Tiny()
    other = Tiny(width=3)
    params = [*model.parameters(), *other.parameters()] if two_models else list(model.parameters())
    optimizer = torch.optim.AdamW(params, lr=0.02)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0 / (1 + 0.01 * s))
    config = ProjectConfiguration(project_dir=str(root), automatic_checkpoint_naming=True)
    accelerator = Accelerator(project_config=config, cpu=True)
    if two_models:
        model, other, optimizer, scheduler = accelerator.prepare(model, other, optimizer, scheduler)
    else:
        model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    data = batches(1)
    series = Series(root, {}, init=snapshot(model))
    series.extra["model_1"] = {}
    for step in range(1, steps + 1):
        x, y = next(data)
        loss = nn.functional.mse_loss(model(x), y)
        if two_models:
            loss = loss + 0.1 * other(x).pow(2).mean()
        optimizer.zero_grad()
        accelerator.backward(loss)
        optimizer.step()
        scheduler.step()
        if step % every == 0:
            accelerator.save_state()
            series.states[step] = snapshot(model)
            if two_models:
                series.extra["model_1"][step] = snapshot(other)  # type: ignore[index]
    return series


# ----------------------------------------------------------------------------------------------
# transformers Trainer (and PEFT through it)
# ----------------------------------------------------------------------------------------------


def _gpt2(seed: int = 0, dtype: torch.dtype | None = None):
    import transformers

    config = transformers.GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=32, n_positions=8)
    torch.manual_seed(seed)
    model = transformers.GPT2LMHeadModel(config)
    return model.to(dtype) if dtype is not None else model


class _Tokens(torch.utils.data.Dataset):
    def __init__(self, n: int = 256, length: int = 8, seed: int = 0) -> None:
        generator = torch.Generator().manual_seed(seed)
        base = torch.randint(0, 32, (n, 1), generator=generator)
        self.ids = (base + torch.arange(length)) % 32  # a learnable pattern: count up

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def hf_trainer(
    root: Path,
    steps: int = 40,
    every: int = 10,
    dtype: torch.dtype | None = None,
    peft: bool = False,
    save_model: bool = True,
) -> Series:
    """``trainer.train()`` with ``save_steps``, then ``trainer.save_model()`` into the same output_dir."""
    import transformers

    model = _gpt2(0, dtype)
    base_state = snapshot(model)
    if peft:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=2, lora_alpha=4, target_modules=["c_attn"], lora_dropout=0.0))
    series = Series(root, {}, init=base_state)
    series.extra["base_state"] = base_state

    class Capture(transformers.TrainerCallback):
        def on_save(self, args, state, control, **kwargs):
            if peft:
                from peft import get_peft_model_state_dict

                series.states[state.global_step] = {
                    k: v.detach().clone() for k, v in get_peft_model_state_dict(model).items()
                }
            else:
                series.states[state.global_step] = snapshot(model)

    args = transformers.TrainingArguments(
        output_dir=str(root),
        max_steps=steps,
        save_steps=every,
        per_device_train_batch_size=8,
        learning_rate=0.01,
        report_to=[],
        use_cpu=True,
        logging_strategy="no",
        save_strategy="steps",
        dataloader_num_workers=0,
        disable_tqdm=True,
        seed=0,
    )
    trainer = transformers.Trainer(model=model, args=args, train_dataset=_Tokens(), callbacks=[Capture()])
    trainer.train()
    if save_model:
        trainer.save_model()
    return series


# ----------------------------------------------------------------------------------------------
# Lightning ModelCheckpoint(every_n_train_steps, save_top_k=-1, save_last=True)
# ----------------------------------------------------------------------------------------------


def lightning_module_class():
    import lightning

    class LitTiny(lightning.LightningModule):
        def __init__(self, width: int = 8, lr: float = 0.02) -> None:
            super().__init__()
            self.save_hyperparameters()
            self.net = Tiny(width)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.net(x)

        def training_step(self, batch, batch_idx):
            x, y = batch
            return nn.functional.mse_loss(self.net(x), y)

        def configure_optimizers(self):
            return torch.optim.AdamW(self.parameters(), lr=self.hparams.lr)

    return LitTiny


def lightning_run(root: Path, steps: int = 40, every: int = 10, steps_per_epoch: int = 16) -> Series:
    import lightning
    from lightning.pytorch.callbacks import ModelCheckpoint

    LitTiny = lightning_module_class()
    torch.manual_seed(2)
    module = LitTiny(width=6)
    data = batches(2)
    pairs = [next(data) for _ in range(steps_per_epoch)]
    xs = torch.cat([p[0] for p in pairs])
    ys = torch.cat([p[1] for p in pairs])
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(xs, ys), batch_size=16)
    series = Series(root, {}, init=snapshot(module))

    class Capture(lightning.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if trainer.global_step % every == 0:
                series.states[trainer.global_step] = snapshot(pl_module)

    checkpoint = ModelCheckpoint(dirpath=str(root), every_n_train_steps=every, save_top_k=-1, save_last=True)
    trainer = lightning.Trainer(
        max_steps=steps,
        callbacks=[Capture(), checkpoint],
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=str(root.parent),
    )
    trainer.fit(module, loader)
    series.extra["cls"] = LitTiny
    return series


# ----------------------------------------------------------------------------------------------
# timm CheckpointSaver (epoch-numbered checkpoint-N.pth.tar, last/model_best hard links)
# ----------------------------------------------------------------------------------------------


def stub_torchvision() -> None:
    """Import timm with inert ``torchvision`` modules in place (see the module docstring), then take them out of
    ``sys.modules`` again, so that libraries imported later (Lightning) do not find a torchvision."""
    if "timm" in sys.modules:
        return

    class _Placeholder(type):
        def __getattr__(cls, name: str):
            if name.startswith("__"):
                raise AttributeError(name)
            return _Placeholder(name, (), {})

    class _Module(types.ModuleType):
        def __getattr__(self, name: str):
            if name.startswith("__"):
                raise AttributeError(name)
            return _Placeholder(name, (), {})

    names = [
        "torchvision",
        "torchvision.ops",
        "torchvision.ops.misc",
        "torchvision.transforms",
        "torchvision.transforms.functional",
        "torchvision.transforms.v2",
        "torchvision.datasets",
        "torchvision.io",
    ]
    for name in names:
        module = _Module(name)
        module.__spec__ = importlib.machinery.ModuleSpec(name, None)
        module.__path__ = []
        sys.modules[name] = module
    for name in names:
        if "." in name:
            parent, _, child = name.rpartition(".")
            setattr(sys.modules[parent], child, sys.modules[name])
    try:
        import timm  # noqa: F401
        import timm.utils  # noqa: F401
    except ImportError:
        pass  # not installed: the test skips
    finally:
        for name in names:
            sys.modules.pop(name, None)


TIMM_MODEL = "test_vit"


def timm_model(seed: int = 3):
    stub_torchvision()
    import timm

    torch.manual_seed(seed)
    return timm.create_model(
        TIMM_MODEL, pretrained=False, num_classes=3, img_size=16, in_chans=1, patch_size=4, embed_dim=16, depth=1
    )


def timm_run(root: Path, epochs: int = 4, steps_per_epoch: int = 6) -> Series:
    """timm train.py's saving: ``CheckpointSaver(model, optimizer, args, model_ema)`` once per epoch."""
    stub_torchvision()
    from timm.utils import CheckpointSaver, ModelEmaV3

    model = timm_model()
    model_ema = ModelEmaV3(model, decay=0.9)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.01)
    args = argparse.Namespace(model=TIMM_MODEL, lr=0.01, epochs=epochs, batch_size=8, num_classes=3)
    root.mkdir(parents=True)
    saver = CheckpointSaver(model, optimizer, args=args, model_ema=model_ema, checkpoint_dir=str(root), max_history=10)
    generator = torch.Generator().manual_seed(3)
    series = Series(root, {}, init=snapshot(model))
    step = 0
    for epoch in range(epochs):
        for _ in range(steps_per_epoch):
            x = torch.randn(8, 1, 16, 16, generator=generator)
            y = (x.mean(dim=(1, 2, 3)) > 0).long() + (x[:, 0, 0, 0] > 1).long()
            loss = nn.functional.cross_entropy(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            model_ema.update(model, step=step)
            step += 1
        metric = 1.0 / (1 + epoch) if epoch != 2 else 5.0  # epoch 2 is the best: model_best links to it
        saver.save_checkpoint(epoch, metric=metric)
        series.states[step] = snapshot(model)
    series.extra["steps_per_epoch"] = steps_per_epoch
    return series


# ----------------------------------------------------------------------------------------------
# ema-pytorch PostHocEMA and pytorch-posthoc-ema: {index}.{step}.pt snapshot folders
# ----------------------------------------------------------------------------------------------

TRACKED = (0.05, 0.28)


def _train_every_step(model: nn.Module, steps: int, seed: int, after_step: Callable[[int], None]) -> list[State]:
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    data = batches(seed)
    every_step = [snapshot(model)]
    for step in range(1, steps + 1):
        x, y = next(data)
        loss = nn.functional.mse_loss(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        every_step.append(snapshot(model))
        after_step(step)
    return every_step


def ema_pytorch_run(root: Path, steps: int = 60, every: int = 10, dtype: torch.dtype | None = None) -> Series:
    """ema-pytorch's ``PostHocEMA`` with its default checkpoint dtype (FP16) unless ``dtype`` is given."""
    from ema_pytorch import PostHocEMA

    torch.manual_seed(4)
    model = Tiny()
    kwargs = {} if dtype is None else {"checkpoint_dtype": dtype}
    emas = PostHocEMA(
        model,
        sigma_rels=TRACKED,
        update_every=1,
        checkpoint_every_num_steps=every,
        checkpoint_folder=str(root),
        **kwargs,
    )
    every_step = _train_every_step(model, steps, 4, lambda step: emas.update())
    series = Series(root, {s: every_step[s] for s in range(every, steps + 1, every)}, init=every_step[0])
    series.extra.update(every_step=every_step, emas=emas, model=model)
    return series


def posthoc_ema_run(root: Path, steps: int = 60, every: int = 10) -> Series:
    """pytorch-posthoc-ema's ``PostHocEMA.from_model`` (bare keys plus ``initted``/``step``)."""
    from posthoc_ema import PostHocEMA

    torch.manual_seed(5)
    model = Tiny()
    emas = PostHocEMA.from_model(
        model,
        root,
        sigma_rels=TRACKED,
        update_every=1,
        checkpoint_every=every,
        update_after_step=0,
        max_checkpoints=100,
    )
    every_step = _train_every_step(model, steps, 5, lambda step: emas.update_(model))
    series = Series(root, {s: every_step[s] for s in range(every, steps + 1, every)}, init=every_step[0])
    series.extra.update(every_step=every_step, emas=emas, model=model)
    return series


# ----------------------------------------------------------------------------------------------
# diffusers training scripts: accelerate save_state with the scripts' save_model_hook
# ----------------------------------------------------------------------------------------------


def tiny_unet(seed: int = 6):
    from diffusers import UNet2DModel

    torch.manual_seed(seed)
    return UNet2DModel(
        sample_size=8,
        in_channels=1,
        out_channels=1,
        layers_per_block=1,
        block_out_channels=(4, 8),
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
        norm_num_groups=2,
    )


def diffusers_unconditional(root: Path, steps: int = 24, every: int = 8) -> Series:
    """examples/unconditional_image_generation/train_unconditional.py's saving, on a tiny UNet2DModel:
    ``save_model_hook`` writes ``unet_ema/`` and ``unet/`` with ``save_pretrained``, ``save_state`` writes
    ``checkpoint-{global_step}/``, and the final ``DDPMPipeline.save_pretrained(output_dir)`` lands beside
    them. ``base/`` is the pipeline the run started from (for ``--init``)."""
    from accelerate import Accelerator
    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel
    from diffusers.training_utils import EMAModel

    output_dir = root / "output"
    model = tiny_unet()
    scheduler = DDPMScheduler(num_train_timesteps=100)
    DDPMPipeline(unet=model, scheduler=scheduler).save_pretrained(root / "base")
    ema_model = EMAModel(model.parameters(), decay=0.99, model_cls=UNet2DModel, model_config=model.config)
    accelerator = Accelerator(cpu=True)

    def save_model_hook(models, weights, output_dir):  # as in train_unconditional.py
        if accelerator.is_main_process:
            ema_model.save_pretrained(str(Path(output_dir) / "unet_ema"))
            for m in models:
                m.save_pretrained(str(Path(output_dir) / "unet"))
                weights.pop()

    accelerator.register_save_state_pre_hook(save_model_hook)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model, optimizer = accelerator.prepare(model, optimizer)
    generator = torch.Generator().manual_seed(6)
    series = Series(output_dir, {}, init=snapshot(model, "unet/"))
    for global_step in range(1, steps + 1):
        clean = torch.randn(4, 1, 8, 8, generator=generator)
        noise = torch.randn(4, 1, 8, 8, generator=generator)
        t = torch.randint(0, 100, (4,), generator=generator)
        noisy = scheduler.add_noise(clean, noise, t)
        loss = nn.functional.mse_loss(model(noisy, t).sample, noise)
        optimizer.zero_grad()
        accelerator.backward(loss)
        optimizer.step()
        ema_model.step(model.parameters())
        if global_step % every == 0:
            accelerator.save_state(str(output_dir / f"checkpoint-{global_step}"))
            series.states[global_step] = snapshot(model, "unet/")
    DDPMPipeline(unet=accelerator.unwrap_model(model), scheduler=scheduler).save_pretrained(output_dir)
    return series


def tiny_cond_unet(seed: int = 7):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=8,
        in_channels=1,
        out_channels=1,
        layers_per_block=1,
        block_out_channels=(4, 8),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=8,
        attention_head_dim=2,
        norm_num_groups=2,
    )


def diffusers_lora(root: Path, steps: int = 24, every: int = 8) -> Series:
    """examples/text_to_image/train_text_to_image_lora.py's saving on a tiny UNet2DConditionModel:
    ``save_model_hook`` calls ``StableDiffusionPipeline.save_lora_weights(output_dir, unet_lora_layers=...)``
    inside ``checkpoint-{global_step}/``; the final ``save_lora_weights(output_dir)`` lands beside them."""
    from accelerate import Accelerator
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    output_dir = root / "output"
    unet = tiny_cond_unet()
    unet.requires_grad_(False)
    unet.add_adapter(
        LoraConfig(r=2, lora_alpha=2, init_lora_weights="gaussian", target_modules=["to_k", "to_q", "to_v", "to_out.0"])
    )
    accelerator = Accelerator(cpu=True)

    def lora_state(model) -> State:
        return convert_state_dict_to_diffusers(get_peft_model_state_dict(accelerator.unwrap_model(model)))

    def save_model_hook(models, weights, output_dir):  # as in train_text_to_image_lora.py
        if accelerator.is_main_process:
            unet_lora_layers_to_save = None
            for model in models:
                unet_lora_layers_to_save = lora_state(model)
                weights.pop()
            StableDiffusionPipeline.save_lora_weights(
                save_directory=output_dir, unet_lora_layers=unet_lora_layers_to_save, safe_serialization=True
            )

    accelerator.register_save_state_pre_hook(save_model_hook)
    optimizer = torch.optim.AdamW([p for p in unet.parameters() if p.requires_grad], lr=1e-2)
    unet, optimizer = accelerator.prepare(unet, optimizer)
    generator = torch.Generator().manual_seed(7)
    series = Series(output_dir, {}, init={f"unet.{k}": v.clone() for k, v in lora_state(unet).items()})
    for global_step in range(1, steps + 1):
        sample = torch.randn(2, 1, 8, 8, generator=generator)
        text = torch.randn(2, 3, 8, generator=generator)
        t = torch.randint(0, 100, (2,), generator=generator)
        loss = unet(sample, t, encoder_hidden_states=text).sample.pow(2).mean()
        optimizer.zero_grad()
        accelerator.backward(loss)
        optimizer.step()
        if global_step % every == 0:
            accelerator.save_state(str(output_dir / f"checkpoint-{global_step}"))
            series.states[global_step] = {f"unet.{k}": v.clone() for k, v in lora_state(unet).items()}
    StableDiffusionPipeline.save_lora_weights(
        save_directory=output_dir, unet_lora_layers=lora_state(unet), safe_serialization=True
    )
    series.extra["unet"] = accelerator.unwrap_model(unet)
    return series


def read_json(path: Path) -> object:
    return json.loads(path.read_text())
