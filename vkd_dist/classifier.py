"""`VKDImageClassifier`: the self-contained image model `vkd-export` writes (vkd_dist/deploy.py) and
`vkd-predict` runs. `VKDImageClassifier.from_pretrained(DIR)` needs nothing else: no run directory, tokenizer,
text stack, shards, ImageNet weights file or network. Preprocessing is the converters' own
(`vkd_dist/data/images.py` `load_image` at the data set's image size and resize mode, then the trainer's resize to
the model's input size), so a file predicted from disk gets exactly the pixels its converted shard sample had.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from vkd_dist.model_dir import CARD_FILE, CONFIG_FILE, FORMAT, WEIGHTS_FILE, ModelDirError
from vkd_dist.models.encoders import ImageEncoder
from vkd_dist.models.vkd import VKDModel


class VKDImageClassifier(VKDModel):
    """The deployed image path of a VKD (or baseline) run: image encoder -> prior p(z|x) -> classifier (on z, or
    on [z, image features] with architecture.image_head=separate; model dirs from before the key are shared)."""

    def __init__(self, config: dict):
        arch = config["architecture"]
        encoder = ImageEncoder(arch["image_encoder"], config["preprocessing"]["image_size"], arch["in_chans"],
                               None, arch.get("image_encoder_kwargs") or {})
        norm = config["preprocessing"]["normalisation"]
        encoder.mean.fill_(norm["mean"])  # the statistics the run used, whatever timm's defaults become
        encoder.std.fill_(norm["std"])
        super().__init__(encoder, None, latent_dim=arch["latent_dim"], hidden_dim=arch["hidden_dim"],
                         dropout=arch.get("dropout", 0.0), num_labels=len(config["labels"]),
                         image_head=arch.get("image_head", "shared"))
        self.config = config
        self.labels: tuple[str, ...] = tuple(config["labels"])
        self.eval()

    # -- files --------------------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, model_dir: str | Path, device="cpu") -> VKDImageClassifier:
        model_dir = Path(model_dir)
        cfg_path, weights_path = model_dir / CONFIG_FILE, model_dir / WEIGHTS_FILE
        if not cfg_path.is_file():
            raise ModelDirError(f"{cfg_path}: not found; {model_dir} is not a vkd-export model directory")
        try:
            config = json.loads(cfg_path.read_text())
        except json.JSONDecodeError as exc:
            raise ModelDirError(f"{cfg_path}: not valid JSON ({exc})") from exc
        if config.get("format") != FORMAT:
            raise ModelDirError(f"{cfg_path}: format {config.get('format')!r}, expected {FORMAT!r}")
        for key in ("labels", "architecture", "preprocessing"):
            if key not in config:
                raise ModelDirError(f"{cfg_path}: missing key {key!r}")
        if not weights_path.is_file():
            raise ModelDirError(f"{weights_path}: not found")
        model = cls(config)
        try:
            state = load_file(str(weights_path))
        except Exception as exc:  # safetensors raises its own error types for a damaged file
            raise ModelDirError(f"{weights_path}: not a readable safetensors file ({exc})") from exc
        load_exactly(model, state, weights_path)
        return model.to(device)

    def save_pretrained(self, out_dir: str | Path, card: Optional[str] = None) -> Path:
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in self.state_dict().items()}
        save_file(state, str(out_dir / WEIGHTS_FILE), metadata={"format": "pt"})
        (out_dir / CONFIG_FILE).write_text(json.dumps(self.config, indent=2))
        if card is not None:
            (out_dir / CARD_FILE).write_text(card)
        return out_dir

    # -- inference ----------------------------------------------------------------------------------------
    def load_image(self, path: str | Path) -> np.ndarray:
        """A file (PNG, JPEG, DICOM) -> uint8 [S, S], exactly as the converters and the loader prepared it.
        Raises vkd_dist.data.images.ImageError for a file that cannot be used."""
        from vkd_dist.data.images import load_image
        from vkd_dist.data.pipeline import fit

        pre = self.config["preprocessing"]
        return fit(load_image(path, pre["source_size"], pre["resize"]), pre["image_size"])

    @torch.no_grad()
    def predict_images(self, images: np.ndarray, mc_samples: Optional[int] = None
                       ) -> tuple[np.ndarray, Optional[np.ndarray]]:
        """uint8 [B, S, S] -> (probabilities [B, L], spread [B, L] or None). `mc_samples` K averages K prior
        samples and gives their standard deviation; otherwise the configured inference mode."""
        device = next(self.parameters()).device
        x = torch.from_numpy(np.require(images, np.uint8, ["C", "W"]))[:, None].to(device)
        mode = "mc" if mc_samples else self.config["inference"]["mode"]
        probs, std = self.predict(x, mode, mc_samples or self.config["inference"]["num_samples"])
        return probs.cpu().numpy(), None if std is None else std.cpu().numpy()


def load_exactly(model: torch.nn.Module, state: dict, path: Path) -> None:
    want = model.state_dict()
    missing = sorted(set(want) - set(state))
    extra = sorted(set(state) - set(want))
    if missing or extra:
        raise ModelDirError(f"{path}: tensors do not match config.json's architecture ("
                            + (f"missing {len(missing)}, e.g. {missing[0]!r}" if missing else "")
                            + ("; " if missing and extra else "")
                            + (f"unexpected {len(extra)}, e.g. {extra[0]!r}" if extra else "") + ")")
    bad = next((k for k in want if tuple(want[k].shape) != tuple(state[k].shape)), None)
    if bad is not None:
        raise ModelDirError(f"{path}: tensor {bad!r} has shape {tuple(state[bad].shape)}, config.json's "
                            f"architecture needs {tuple(want[bad].shape)}")
    model.load_state_dict({k: v.to(torch.float32) for k, v in state.items()})
