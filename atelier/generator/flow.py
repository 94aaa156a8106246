"""Conditional flow matching (rectified flow; Liu et al. 2022, Lipman et al. 2022) with a small U-Net.

Training: x_t = (1 - t) z + t x for noise z ~ N(0, I) and a real image x, and the network
learns the velocity x - z at (x_t, t, condition) by mean squared error. t is drawn from a
logit-normal (Esser et al. 2024: most weight on the middle of the path) or uniformly.

Sampling (`forward(z, condition)`, what serving calls): the ODE dx/dt = v(x, t, y) is
integrated from the noise z at t = 0 to t = 1 in `sample_steps` steps (Euler, midpoint or
Heun), so a drawing is a deterministic function of its z and condition, and each row is
computed independently of the others in its batch (GroupNorm, no batch statistics).

Guidance: every attribute group is dropped from the condition with `condition_dropout`
(per image and group) and the whole condition with `drop_all`; a dropped group takes the
learned "any" embedding of ConditionEmbedding. The model thus knows p(x), p(x | one group),
p(x | all groups). A request may name any subset of the groups; the groups left out are
drawn from what the model learned. Classifier-free guidance with weight w pushes the
velocity away from the unconditional one: v = v(∅) + w (v(y) - v(∅)). With
`compose="groups"` each named group is guided on its own and their pulls add up, a product
of the per-group conditionals (Liu et al. 2022, composable diffusion): it costs one
network pass per named group and step, but can draw pairs never seen together in training.

The U-Net: with `patch` p > 1 the image is first folded into p x p pixel blocks (pixel unshuffle:
a 64 px RGB image becomes 32 x 32 x 12), so every layer runs at 1/p of the size, and the output
is unfolded again (Hoogeboom et al. 2023 and DiT's patches work the same way); then a 3x3 stem, per resolution `blocks` residual blocks (GroupNorm, SiLU, 3x3
convolutions; time + condition embedding as a per-channel scale and shift), a strided
convolution down to the next resolution, self-attention at the lowest one, and the mirror
path up with skip connections. The output convolution starts at zero.

The weights a checkpoint serves are the exponential moving average of the trained ones
(decay `ema_decay`); the trained weights and Adam's state are saved beside them, so a
resumed run goes on exactly where it stopped.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from atelier.catalog.schema import AttributeSchema
from atelier.generator.base import ConditionalGenerator, register
from atelier.generator.checkpoint import OptimizerState
from atelier.generator.conditioning import ConditionEmbedding, drop_groups
from atelier.generator.distributed import StepRandom, World
from atelier.generator.recipes import ema_update

SOLVERS = ("euler", "midpoint", "heun")
TIME_SAMPLING = ("logit-normal", "uniform")
COMPOSE = ("joint", "groups")


@dataclass
class FlowConfig:
    image_size: int = 28
    channels: int = 1
    width: int = 32  # channels at the U-Net's full resolution
    patch: int = 1  # pixels per side folded into channels before the U-Net (pixel unshuffle): 2 quarters its cost
    multipliers: tuple[int, ...] = (1, 2, 2)  # width multiplier per resolution, halving the size each time
    blocks: int = 1  # residual blocks per resolution on the way down (one more on the way up)
    embed_dim: int = 32  # per attribute group
    condition_dropout: float = 0.15  # per group and image, in training
    drop_all: float = 0.1  # probability of dropping the whole condition (the unconditional model)
    time_sampling: str = "logit-normal"
    lr: float = 5e-4
    warmup_steps: int = 500
    # a cool-down (warmup-stable-decay): from step cooldown_start the learning rate falls linearly
    # to 0 over cooldown_steps (0: constant); set on a resumed copy of a run to fork a finished model
    cooldown_start: int = 0
    cooldown_steps: int = 0
    ema_decay: float = 0.999
    grad_clip: float = 1.0
    # sampling (may differ per served copy; they do not change the weights)
    sample_steps: int = 10
    solver: str = "midpoint"
    guidance: float = 2.0  # 1: no guidance; 0: the unconditional model
    compose: str = "joint"

    def __post_init__(self) -> None:
        self.multipliers = tuple(int(m) for m in self.multipliers)


def _groups(channels: int) -> int:
    return math.gcd(8, channels)


def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal features of t in [0, 1] (scaled by 1000, as diffusion models do)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10_000) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    angles = 1000 * t.float()[:, None] * freqs[None]
    return torch.cat([angles.cos(), angles.sin()], dim=1)


class ResBlock(nn.Module):
    def __init__(self, w_in: int, w_out: int, emb_dim: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(_groups(w_in), w_in)
        self.conv1 = nn.Conv2d(w_in, w_out, 3, 1, 1)
        self.emb = nn.Linear(emb_dim, 2 * w_out)
        self.norm2 = nn.GroupNorm(_groups(w_out), w_out)
        self.conv2 = nn.Conv2d(w_out, w_out, 3, 1, 1)
        nn.init.zeros_(self.conv2.weight)
        nn.init.zeros_(self.conv2.bias)
        self.skip = nn.Conv2d(w_in, w_out, 1) if w_in != w_out else nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        scale, shift = self.emb(emb)[:, :, None, None].chunk(2, dim=1)
        h = self.norm2(h) * (1 + scale) + shift
        return self.skip(x) + self.conv2(F.silu(h))


class Attention(nn.Module):
    def __init__(self, width: int, heads: int = 4):
        super().__init__()
        self.norm = nn.GroupNorm(_groups(width), width)
        self.qkv = nn.Conv2d(width, 3 * width, 1)
        self.out = nn.Conv2d(width, width, 1)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)
        self.heads = heads

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(n, 3, self.heads, c // self.heads, h * w).transpose(-1, -2).unbind(1)
        out = F.scaled_dot_product_attention(q, k, v)  # (n, heads, hw, c/heads)
        return x + self.out(out.transpose(-1, -2).reshape(n, c, h, w))


class UNet(nn.Module):
    """v(x_t, t, embedded condition) -> velocity, same shape as x_t."""

    def __init__(self, config: FlowConfig, cond_dim: int):
        super().__init__()
        widths = [config.width * m for m in config.multipliers]
        if config.patch < 1 or config.image_size % config.patch:
            raise ValueError(f"patch {config.patch} must be at least 1 and divide image_size {config.image_size}")
        size = config.image_size // config.patch
        for _ in widths[1:]:
            if size % 2:
                raise ValueError(f"image_size {config.image_size} / patch {config.patch} cannot be halved "
                                 f"{len(widths) - 1} times (multipliers {config.multipliers})")
            size //= 2
        self.patch = config.patch
        folded = config.channels * config.patch**2
        emb_dim = 4 * config.width
        self.time_dim = config.width
        self.time = nn.Sequential(nn.Linear(config.width, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.cond = nn.Sequential(nn.Linear(cond_dim, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.stem = nn.Conv2d(folded, widths[0], 3, 1, 1)
        self.down = nn.ModuleList()
        self.downsample = nn.ModuleList()
        skips, w_in = [widths[0]], widths[0]
        for level, w in enumerate(widths):
            blocks = nn.ModuleList()
            for _ in range(config.blocks):
                blocks.append(ResBlock(w_in, w, emb_dim))
                w_in = w
                skips.append(w)
            self.down.append(blocks)
            if level < len(widths) - 1:
                self.downsample.append(nn.Conv2d(w, w, 3, 2, 1))
                skips.append(w)
        self.mid1 = ResBlock(w_in, w_in, emb_dim)
        self.mid_attention = Attention(w_in)
        self.mid2 = ResBlock(w_in, w_in, emb_dim)
        self.up = nn.ModuleList()
        self.upsample = nn.ModuleList()
        for level, w in reversed(list(enumerate(widths))):
            blocks = nn.ModuleList()
            for _ in range(config.blocks + 1):
                blocks.append(ResBlock(w_in + skips.pop(), w, emb_dim))
                w_in = w
            self.up.append(blocks)
            if level > 0:  # to the next resolution's width before the (4x larger) convolution runs
                self.upsample.append(nn.Conv2d(w, widths[level - 1], 3, 1, 1))
                w_in = widths[level - 1]
        self.out_norm = nn.GroupNorm(_groups(w_in), w_in)
        self.out = nn.Conv2d(w_in, folded, 3, 1, 1)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        emb = self.time(timestep_embedding(t, self.time_dim)) + self.cond(cond)
        h = self.stem(F.pixel_unshuffle(x, self.patch) if self.patch > 1 else x)
        skips = [h]
        for level, blocks in enumerate(self.down):
            for block in blocks:
                h = block(h, emb)
                skips.append(h)
            if level < len(self.downsample):
                h = self.downsample[level](h)
                skips.append(h)
        h = self.mid2(self.mid_attention(self.mid1(h, emb)), emb)
        for level, blocks in enumerate(self.up):
            for block in blocks:
                h = block(torch.cat([h, skips.pop()], dim=1), emb)
            if level < len(self.upsample):
                h = self.upsample[level](F.interpolate(h, scale_factor=2.0, mode="nearest"))
        out = self.out(F.silu(self.out_norm(h)))
        return F.pixel_shuffle(out, self.patch) if self.patch > 1 else out


@register
class Flow(ConditionalGenerator):
    family = "flow"
    Config = FlowConfig
    accepts_partial = True

    SAMPLING_OPTIONS = ("sample_steps", "solver", "guidance", "compose")
    SCHEDULE_OPTIONS = ("lr", "cooldown_start", "cooldown_steps", "ema_decay")

    def __init__(self, schema: AttributeSchema, config: FlowConfig | None = None):
        config = config or FlowConfig()
        self.check_config(config)
        super().__init__(schema, config)
        self.embed = ConditionEmbedding(schema, config.embed_dim, learn_any=True)
        self.net = UNet(config, self.embed.out_dim)
        self.register_buffer("trained_steps", torch.zeros((), dtype=torch.long))

    def check_config(self, config: FlowConfig) -> None:
        for name, value, allowed in (("solver", config.solver, SOLVERS), ("compose", config.compose, COMPOSE),
                                     ("time_sampling", config.time_sampling, TIME_SAMPLING)):
            if value not in allowed:
                raise ValueError(f"unknown {name} {value!r}; allowed: {', '.join(allowed)}")
        if not (0 <= config.condition_dropout < 1 and 0 <= config.drop_all < 1):
            raise ValueError("condition_dropout and drop_all must be in [0, 1)")
        for name in ("cooldown_start", "cooldown_steps"):
            value = getattr(config, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} {value!r} must be a whole number of steps, at least 0")
        if not (isinstance(config.lr, (int, float)) and config.lr > 0 and 0 <= config.ema_decay < 1):
            raise ValueError(f"lr {config.lr!r} must be above 0 and ema_decay {config.ema_decay!r} in [0, 1)")
        if isinstance(config.sample_steps, bool) or not isinstance(config.sample_steps, int) or config.sample_steps < 1:
            raise ValueError(f"sample_steps {config.sample_steps!r} must be a whole number, at least 1")
        if isinstance(config.guidance, bool) or not isinstance(config.guidance, (int, float)):
            raise ValueError(f"guidance {config.guidance!r} must be a number (1: no guidance)")

    @property
    def latent_dim(self) -> int:  # the noise image the ODE starts from, flattened
        return self.config.channels * self.config.image_size**2

    def keeps_option(self, key: str, value) -> bool:
        if key == "multipliers":
            value = tuple(value)
        return super().keeps_option(key, value)

    def velocity(self, x: torch.Tensor, t: torch.Tensor, condition: torch.Tensor) -> torch.Tensor:
        return self.net(x, t, self.embed(condition))

    def guided_velocity(self, x: torch.Tensor, t: torch.Tensor, condition: torch.Tensor) -> torch.Tensor:
        """Classifier-free guided velocity; every row's conditions go through one network pass."""
        w = self.config.guidance
        if w == 1.0:
            return self.velocity(x, t, condition)
        parts = [torch.zeros_like(condition)]  # the unconditional model first
        if self.config.compose == "joint":
            parts.append(condition)
        else:  # one condition per named group, the others left out
            for block in self._group_masks(condition):
                parts.append(condition * block)
        k = len(parts)
        v = self.velocity(x.repeat(k, 1, 1, 1), t.repeat(k), torch.cat(parts)).view(k, *x.shape)
        named = torch.ones(k - 1, len(x), 1, 1, 1, device=x.device, dtype=x.dtype)
        if self.config.compose == "groups":  # a group the request leaves out adds nothing
            named = torch.stack([(condition * m).sum(dim=1) > 0 for m in self._group_masks(condition)])
            named = named.to(x.dtype)[:, :, None, None, None]
        return v[0] + w * ((v[1:] - v[0]) * named).sum(dim=0)

    def _group_masks(self, condition: torch.Tensor) -> list[torch.Tensor]:
        masks, start = [], 0
        for size in self.embed.sizes:
            mask = torch.zeros(condition.shape[1], device=condition.device, dtype=condition.dtype)
            mask[start:start + size] = 1
            masks.append(mask)
            start += size
        return masks

    def forward(self, z: torch.Tensor, condition: torch.Tensor) -> torch.Tensor:
        """Integrate from the noise z (N, latent_dim) at t = 0 to an image at t = 1, in [-1, 1]."""
        cfg = self.config
        x = z.view(len(z), cfg.channels, cfg.image_size, cfg.image_size)
        return self._integrate(x, condition, forwards=True).clamp(-1, 1)

    can_edit = True

    def invert(self, images: torch.Tensor, condition: torch.Tensor) -> torch.Tensor:
        """The same ODE from the image at t = 1 back to its noise at t = 0 (the solver's steps in
        reverse), so drawing that noise under another condition edits the image."""
        return self._integrate(images, condition, forwards=False).reshape(len(images), -1)

    def _integrate(self, x: torch.Tensor, condition: torch.Tensor, forwards: bool) -> torch.Tensor:
        cfg = self.config
        steps = cfg.sample_steps
        dt = (1.0 if forwards else -1.0) / steps
        for i in range(steps):
            t = torch.full((len(x),), i / steps if forwards else 1 - i / steps, device=x.device)
            v = self.guided_velocity(x, t, condition)
            if cfg.solver == "midpoint":
                v = self.guided_velocity(x + 0.5 * dt * v, t + 0.5 * dt, condition)
            elif cfg.solver == "heun" and i < steps - 1:
                v = 0.5 * (v + self.guided_velocity(x + dt * v, t + dt, condition))
            x = x + dt * v
        return x


def flow_matching_loss(model: Flow, real: torch.Tensor, condition: torch.Tensor, noise: torch.Tensor,
                       t: torch.Tensor) -> torch.Tensor:
    """Mean squared error between the predicted and the straight-path velocity (real - noise)."""
    tt = t[:, None, None, None]
    x_t = (1 - tt) * noise + tt * real
    return (model.velocity(x_t, t, condition) - (real - noise)).pow(2).mean()


def sample_times(n: int, kind: str, device: torch.device, random: StepRandom | None = None) -> torch.Tensor:
    if kind == "uniform":
        return random.rand() if random is not None else torch.rand(n, device=device)
    return torch.sigmoid(random.randn() if random is not None else torch.randn(n, device=device))


def training_condition(condition: torch.Tensor, sizes: list[int], group_p: float, all_p: float,
                       random: StepRandom | None = None) -> torch.Tensor:
    """Drop groups one by one, and the whole condition for some rows (the unconditional model)."""
    condition = drop_groups(condition, sizes, group_p, random)
    if all_p > 0:
        draws = random.rand(1) if random is not None else torch.rand(len(condition), 1, device=condition.device)
        condition = condition * (draws >= all_p).to(condition.dtype)
    return condition


def learning_rate(cfg: FlowConfig, step: int) -> float:
    """Adam's rate at `step`: a linear warm-up, constant, then the cool-down if one is set."""
    rate = cfg.lr * min(1.0, (step + 1) / max(cfg.warmup_steps, 1))
    if cfg.cooldown_steps:
        rate *= min(1.0, max(0.0, (cfg.cooldown_start + cfg.cooldown_steps - step) / cfg.cooldown_steps))
    return rate


class FlowTrainer:
    """Adam on a trained copy of the model; the model itself is the EMA of that copy."""

    def __init__(self, model: Flow):
        self.model = model
        # channels_last: oneDNN's convolutions are faster in it on CPU (about 1.15x here)
        self.online = copy.deepcopy(model).train().to(memory_format=torch.channels_last)
        self.opt = torch.optim.Adam(self.online.parameters(), lr=model.config.lr)
        self.optimizer_state = OptimizerState(self.opt)
        # set by the training loop: each step's draws depend on (seed, step) and the global batch
        # alone, so a data-parallel run equals one process on the same global batches
        self.seed, self.world = 0, World()

    def step(self, real: torch.Tensor, condition: torch.Tensor) -> dict[str, float]:
        online, cfg = self.online, self.model.config
        random = StepRandom(self.seed, int(online.trained_steps), self.world, len(real), real.device)
        condition = training_condition(condition, online.embed.sizes, cfg.condition_dropout, cfg.drop_all, random)
        real = real.contiguous(memory_format=torch.channels_last)
        noise = random.randn(*real.shape[1:]).contiguous(memory_format=torch.channels_last)
        t = sample_times(len(real), cfg.time_sampling, real.device, random)
        return self.update(flow_matching_loss(online, real, condition, noise, t))

    def update(self, loss: torch.Tensor) -> dict[str, float]:
        """One Adam step on the trained copy's `loss` (learning-rate warm-up, clipping), then the EMA."""
        online, cfg = self.online, self.model.config
        step = int(online.trained_steps)
        for group in self.opt.param_groups:
            group["lr"] = learning_rate(cfg, step)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(online.parameters(), cfg.grad_clip)
        self.opt.step()
        online.trained_steps += 1
        decay = min(cfg.ema_decay, (1 + step) / (10 + step))  # a short warm-up: early weights fade fast
        ema_update(self.model, online, decay)  # its buffer trained_steps is copied too
        return {"loss": loss.item(), "grad_norm": float(grad_norm)}

    def extra_state(self) -> dict[str, nn.Module]:
        return {"online": self.online, "optimizer": self.optimizer_state}


Flow.Trainer = FlowTrainer
