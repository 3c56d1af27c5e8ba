"""Shared fixtures: offline, single-threaded, tiny models with non-zero LoRAs."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TLORA_THREADS", "1")  # the CLI and app choose threads from it (tlora_diffusers.threads)

import pytest
import torch
from peft import LoraConfig

torch.set_num_threads(1)

#: LoRA targets per tiny pipeline kind: attention, feed-forward and (SDXL) 3x3 convs.
LORA_TARGETS = {
    "sdxl": ["to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2", "conv1", "conv2", "time_emb_proj"],
    "flux": ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "proj_mlp", "ff.net.0.proj"],
    "flux2-klein": ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "to_qkv_mlp_proj"],
    "flux2": ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "to_qkv_mlp_proj"],
    "sd3": ["to_q", "to_k", "to_v", "to_out.0", "add_k_proj"],
    "sd": ["to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2", "conv1", "conv2", "time_emb_proj"],
}


def add_lora(denoiser: torch.nn.Module, kind: str, rank: int = 8, *, name: str = "default", seed: int = 0,
             alpha: float | None = None, std: float = 0.3, **kw) -> None:
    """Attach a PEFT LoRA with random, non-zero A and B (so every rank changes the output)."""
    torch.manual_seed(seed)
    cfg = LoraConfig(r=rank, lora_alpha=alpha or rank, target_modules=LORA_TARGETS[kind],
                     init_lora_weights=False, **kw)
    denoiser.add_adapter(cfg, adapter_name=name)
    torch.manual_seed(seed + 1)
    with torch.no_grad():
        for n, p in denoiser.named_parameters():
            if f"lora_B.{name}." in n or f"lora_A.{name}." in n:
                p.copy_(torch.randn_like(p) * std)


def unet_inputs(unet: torch.nn.Module, batch: int = 1, seed: int = 0) -> dict:
    """Inputs for a bare UNet2DConditionModel call, sized from its own config."""
    cfg = unet.config
    g = torch.Generator().manual_seed(seed)
    te = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
    return dict(
        sample=torch.randn(batch, cfg.in_channels, 8, 8, generator=g),
        encoder_hidden_states=torch.randn(batch, 5, cfg.cross_attention_dim, generator=g),
        added_cond_kwargs={"text_embeds": torch.randn(batch, te, generator=g), "time_ids": torch.randn(batch, 6, generator=g)},
    )


def run_concurrently(jobs: dict, repeats: int = 3) -> dict:
    """Run each ``name -> fn()`` in its own thread, started together, ``repeats`` times; results per name."""
    import threading

    results, errors = {name: [] for name in jobs}, []
    barrier = threading.Barrier(len(jobs))

    def work(name, fn):
        try:
            barrier.wait()
            for _ in range(repeats):
                results[name].append(fn())
        except BaseException as e:  # re-raised in the caller's thread
            errors.append(e)

    threads = [threading.Thread(target=work, args=item) for item in jobs.items()]
    [t.start() for t in threads]
    [t.join() for t in threads]
    if errors:
        raise errors[0]
    return results


def reference_rank(t: float, max_rank: int, min_rank: int, alpha: float, T: int = 1000) -> int:
    """The paper's formula, written out independently in Python floats (eq. 6)."""
    t = min(max(float(t), 0.0), float(T))
    return int(((T - t) / T) ** alpha * (max_rank - min_rank)) + min_rank


def slot_mode(denoiser: torch.nn.Module):
    """What the denoiser's masked layers apply right now: None (nothing), "weights" or "outputs"."""
    from tlora_diffusers.runtime.attachment import attachment_of

    attachment = attachment_of(denoiser)
    return None if attachment is None else attachment.slot.mode


def state_hash(module: torch.nn.Module) -> dict:
    """Bit-exact fingerprint of a module's state_dict."""
    return {k: (tuple(v.shape), v.dtype, v.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes()
                if v.numel() else b"") for k, v in module.state_dict().items()}


@pytest.fixture
def tiny():
    from tlora_diffusers.tiny import tiny_pipeline

    return tiny_pipeline


def lora_carriers(pipe) -> list:
    """Pipeline components that run a ``lora_A`` layer (a ControlNet may share the transformer's), read off the modules."""
    out = []
    for name, value in vars(pipe).items():
        if isinstance(value, torch.nn.Module) and not type(value).__module__.startswith("transformers."):
            if any(".lora_A." in n for n, _ in value.named_modules()):
                out.append(name)
    order = ["unet", "transformer", "transformer_2", "unconditional_transformer", "controlnet", "prior"]
    return sorted(out, key=lambda n: (order.index(n) if n in order else len(order), n))


def loop_timestep(pipe) -> float:
    """The pipeline loop's own timestep right now, in scheduler units (0 = clean), read independently
    of tlora_diffusers: ``pipe.current_timestep`` where the pipeline sets it, else the scheduler's entry."""
    current = getattr(pipe, "_current_timestep", None)
    if current is not None:
        return float(torch.as_tensor(current).reshape(-1).max())
    sched = pipe.scheduler
    index = sched.step_index if getattr(sched, "step_index", None) is not None else (
        sched.begin_index if getattr(sched, "begin_index", None) is not None else 0)
    return float(sched.timesteps[index])


class StepRecorder:
    """Records, in order, every denoiser call and every ``scheduler.step(model_output, timestep, ...)``.

    ``scheduler.step`` is wrapped on its class (per-frame copies made with ``deepcopy`` share
    it); each denoiser call is then given the timestep the loop passes to ``pipe.scheduler``'s
    next step: what the loop actually denoised that call for.
    """

    def __init__(self, pipe, attrs):
        self.pipe, self.attrs = pipe, attrs
        self.events = []

    def __enter__(self):
        import functools

        self.classes = {}
        scheduler = getattr(self.pipe, "scheduler", None)
        self.handles = [getattr(self.pipe, a).register_forward_pre_hook(
            lambda m, args, kwargs, a=a: self.events.append(("call", a, None)), with_kwargs=True) for a in self.attrs]
        if scheduler is None:  # Echo: no scheduler, no loop timestep to record
            return self
        cls = type(scheduler)
        original = cls.step

        import math

        T = getattr(scheduler.config, "num_train_timesteps", None)
        inverted = bool(getattr(scheduler.config, "invert_sigmas", False))  # Mochi: the scheduler counts up
        angles = cls.__name__ == "SCMScheduler"  # Sana Sprint: TrigFlow angles; flow time sin/(sin+cos)

        @functools.wraps(original)
        def step(sched, *args, **kwargs):
            t = float(torch.as_tensor(kwargs["timestep"] if "timestep" in kwargs else args[1]).double().reshape(-1).max())
            if angles:
                t = T * math.sin(t) / (math.sin(t) + math.cos(t))
            self.events.append(("step", sched, T - t if inverted else t))
            return original(sched, *args, **kwargs)

        self.classes[cls] = original
        cls.step = step
        return self

    def __exit__(self, *exc):
        for cls, original in self.classes.items():
            cls.step = original
        for h in self.handles:
            h.remove()

    def call_timesteps(self):
        """The loop timestep of each denoiser call, in call order (``None`` if no step followed)."""
        out, pending = [], 0
        for kind, who, t in self.events:
            if kind == "call":
                out.append(None)
                pending += 1
            elif who is getattr(self.pipe, "scheduler", None) and pending:
                for i in range(len(out) - pending, len(out)):
                    out[i] = t
                pending = 0
        return out


class ReferenceMasks:
    """An independent reference: plain PyTorch hooks on an *unpatched* pipeline's ``lora_A`` modules
    that zero the ranks above r(t) (the paper's formula, written out here) of the timestep the loop
    passes to ``scheduler.step`` after each call (recorded by a first run, :meth:`record`).

    ``configs``: adapter -> (max_rank, min_rank, alpha, lora_ranks_per_schedule_rank), on ``attrs``.
    ``per_token``: the pipeline passes (B, tokens) or (B, frames) timesteps in scheduler units; a layer
    named by ``token_layer`` (the model's token rows, frame-major) is masked token by token, every other
    layer by the loop's timestep.
    """

    def __init__(self, pipe, configs, attrs=None, per_token=False, timestep_arg="timestep", token_layer=None,
                 layer_timesteps=None, T=None, fixed_calls=None):
        self.pipe, self.configs, self.T = pipe, configs, T  # T: for schedulers without num_train_timesteps
        self.fixed_calls = fixed_calls  # kwargs -> the timestep the model runs the call at, or None
        self.layer_timesteps = layer_timesteps or {}  # arg -> path predicate: those layers follow that argument
        self.attrs = attrs or [a for a in ("unet", "transformer", "transformer_2", "controlnet")
                               if isinstance(getattr(pipe, a, None), torch.nn.Module)]
        self.per_token, self.timestep_arg, self.token_layer = per_token, timestep_arg, token_layer
        self.handles, self.state = [], {}
        self.ranks_seen, self.times = [], []
        self.recorded = None

    def record(self, run):
        """Run ``run()`` once unpatched and unmasked, recording each call's loop timestep; returns its result."""
        with StepRecorder(self.pipe, self.attrs) as rec:
            result = run()
        self.recorded = rec.call_timesteps()
        return result

    def __enter__(self):
        scheduler = getattr(self.pipe, "scheduler", None)
        T = getattr(getattr(scheduler, "config", None), "num_train_timesteps", None) or self.T
        calls = iter(range(10 ** 9))
        for attr in self.attrs:
            den = getattr(self.pipe, attr)

            def pre(module, args, kwargs):
                i = next(calls)
                t = self.recorded[i] if self.recorded is not None and i < len(self.recorded) else None
                fixed = self.fixed_calls(kwargs) if self.fixed_calls is not None else None
                if fixed is not None:
                    t = fixed  # a call the model runs at its own timestep (a KV-cache fill, a reference pass)
                if t is None and getattr(self.pipe, "scheduler", None) is None:  # no scheduler: the argument
                    t = float(torch.as_tensor(kwargs.get(self.timestep_arg)).double().max())
                if t is None:
                    t = loop_timestep(self.pipe)
                self.state["t"] = t
                self.times.append(t)
                self.state["raw"] = kwargs.get(self.timestep_arg)
                self.state["extra"] = {arg: kwargs.get(arg) for arg in self.layer_timesteps}
                self.ranks_seen.append({a: reference_rank(t, *c[:3], T=T) for a, c in self.configs.items()})

            self.handles.append(den.register_forward_pre_hook(pre, with_kwargs=True))
            for name, module in den.named_modules():
                for adapter, (max_rank, min_rank, alpha, per) in self.configs.items():
                    if not name.endswith(f"lora_A.{adapter}"):
                        continue
                    path = name[: -len(f".lora_A.{adapter}")]

                    def hook(m, args, out, c=(max_rank, min_rank, alpha, per), path=path):
                        dim = -1 if isinstance(m, torch.nn.Linear) else 1
                        for arg, follows in self.layer_timesteps.items():
                            other = self.state["extra"].get(arg)
                            if other is not None and follows(path):  # per sample, scheduler units
                                other = torch.as_tensor(other).double().reshape(out.shape[0], -1).amax(dim=1)
                                r = torch.tensor([reference_rank(float(v), *c[:3], T=T) * c[3] for v in other])
                                mask = (torch.arange(out.shape[dim])[None] < r[:, None]).to(out.dtype)
                                shape = [1] * out.ndim
                                shape[0], shape[dim] = out.shape[0], out.shape[dim]
                                return out * mask.reshape(shape)
                        raw = self.state.get("raw")
                        raw = torch.as_tensor(raw) if raw is not None else None
                        while raw is not None and raw.ndim > 1 and raw.shape[-1] == 1:
                            raw = raw[..., 0]
                        tokenwise = (self.per_token and raw is not None and raw.ndim == 2 and out.ndim == 3
                                     and out.shape[0] == raw.shape[0] and out.shape[1] % raw.shape[1] == 0
                                     and (self.token_layer is None or self.token_layer(path)))
                        if tokenwise:
                            t_tok = raw.double().repeat_interleave(out.shape[1] // raw.shape[1], dim=1)
                            r = torch.tensor([[reference_rank(float(v), *c[:3], T=T) for v in row] for row in t_tok])
                            mask = (torch.arange(out.shape[-1])[None, None] < (r * c[3])[..., None]).to(out.dtype)
                            return out * mask
                        r = reference_rank(self.state["t"], *c[:3], T=T) * c[3]
                        mask = (torch.arange(out.shape[dim]) < r).to(out.dtype)
                        shape = [1] * out.ndim
                        shape[dim] = out.shape[dim]
                        return out * mask.reshape(shape)

                    self.handles.append(module.register_forward_hook(hook))
        return self

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()
