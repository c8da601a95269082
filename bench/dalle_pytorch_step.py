"""DALLE-pytorch's training step, timed: the baseline of `bench/prior.py --reference`.

Runs ONLY inside bench/.venv-dalle-pytorch (created by bench/prior.py from
bench/requirements-dalle-pytorch.txt), never in the project's venv. argv[1] is a
JSON object: {"dim", "depth", "heads", "dim_head", "text_len", "text_vocab",
"grid", "image_vocab", "batch", "steps", "attn_types", "bf16", "threads"}.
Prints one JSON line: {"step_s": median seconds per update, ...}.

Only `dalle_pytorch.dalle_pytorch` and its transformer are loaded, by path, without
the package's __init__: the package imports its VQGAN / OpenAI VAE wrappers at
import time (taming-transformers -> torchvision, pytorch-lightning), which have no
build for this torch and take no part in the prior's training step. The
`dalle_pytorch.vae` module is replaced by a placeholder naming those two classes;
the step uses DALLE-pytorch's own `DiscreteVAE` only for its sizes (image codes are
passed in, as when training on pre-encoded codes).
"""

import importlib.util
import json
import statistics
import sys
import time
import types
from pathlib import Path

import torch


def load_dalle_pytorch():
    spec = importlib.util.find_spec("dalle_pytorch")
    root = Path(spec.submodule_search_locations[0])
    pkg = types.ModuleType("dalle_pytorch")
    pkg.__path__ = [str(root)]
    sys.modules["dalle_pytorch"] = pkg
    vae = types.ModuleType("dalle_pytorch.vae")

    class OpenAIDiscreteVAE:  # placeholder: see the module docstring
        pass

    class VQGanVAE:
        pass

    vae.OpenAIDiscreteVAE, vae.VQGanVAE = OpenAIDiscreteVAE, VQGanVAE
    sys.modules["dalle_pytorch.vae"] = vae
    mod_spec = importlib.util.spec_from_file_location("dalle_pytorch.dalle_pytorch", root / "dalle_pytorch.py")
    mod = importlib.util.module_from_spec(mod_spec)
    sys.modules["dalle_pytorch.dalle_pytorch"] = mod
    mod_spec.loader.exec_module(mod)
    return mod


def main() -> None:
    a = json.loads(sys.argv[1])
    torch.set_num_threads(a["threads"])
    torch.manual_seed(0)
    dp = load_dalle_pytorch()
    layers = {8: 3, 16: 4, 32: 5}.get(a["grid"], 4)
    vae = dp.DiscreteVAE(image_size=a["grid"] * 2 ** layers, num_layers=layers, num_tokens=a["image_vocab"],
                         codebook_dim=32, hidden_dim=16)
    model = dp.DALLE(dim=a["dim"], vae=vae, num_text_tokens=a["text_vocab"], text_seq_len=a["text_len"],
                     depth=a["depth"], heads=a["heads"], dim_head=a["dim_head"],
                     attn_types=tuple(a["attn_types"]))
    model.vae.requires_grad_(False)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    g = torch.Generator().manual_seed(0)
    times = []
    for _ in range(a["steps"]):
        text = torch.randint(1, a["text_vocab"], (a["batch"], a["text_len"]), generator=g)
        codes = torch.randint(0, a["image_vocab"], (a["batch"], a["grid"] ** 2), generator=g)
        t = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bool(a["bf16"])):
            loss = model(text, codes, return_loss=True)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t)
    steady = times[2:] or times
    print(json.dumps({"step_s": statistics.median(steady), "loss": float(loss),
                      "parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
                      "dalle_pytorch": "1.6.6", "torch": torch.__version__}))


if __name__ == "__main__":
    main()
