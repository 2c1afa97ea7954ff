"""Weights out of training checkpoints: single-file Lightning checkpoints, sharded folders, model directories.

Three kinds of source are read, always without executing pickled code (torch.load with weights_only=True;
a sharded folder's `.metadata` pickle through gazelit.integrity's restricted unpickler), and every
checkpoint is verified against its sha256 record first (`verify_checkpoint`): a damaged, empty or foreign
file is one CheckpointError line naming it, never a torch traceback.

* a Lightning checkpoint file (single device / DDP, or FSDP2 with full state dicts),
* a sharded torch.distributed.checkpoint (DCP) folder written by ModelParallelStrategy (`.metadata`,
  `__<rank>_0.distcp` shards, and Lightning's non-tensor state in `meta.pt`),
* a `GazeVLM.save_pretrained` directory (gazelit_config.json + model.safetensors).

`model_state` returns the GazeVLM weights only (for a DCP folder it loads just the model entries, not the
optimiser state). `load_matching_weights` is `init_from`; `export_checkpoint`
is `gazelit export`.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from gazelit.integrity import CheckpointError, read_dcp_metadata, verify_checkpoint
from gazelit.schema import MODEL_CONFIG_FILE, MODEL_WEIGHTS_FILE

log = logging.getLogger(__name__)

MODULE_PREFIX = "model."  # GazeVLMModule holds the GazeVLM as `self.model`
DCP_METADATA = ".metadata"
LIGHTNING_META = "meta.pt"


def is_model_dir(path: str | Path) -> bool:
    return (Path(path) / MODEL_CONFIG_FILE).is_file()


def is_sharded_checkpoint(path: str | Path) -> bool:
    path = Path(path)
    return path.is_dir() and (path / DCP_METADATA).is_file()


# ---------------------------------------------------------------------------------------------- reading
def checkpoint_metadata(path: str | Path) -> dict[str, Any]:
    """Everything but the tensors of model and optimiser: hyper_parameters, loops, callbacks, ..."""
    path = Path(path)
    if is_sharded_checkpoint(path):
        return _load_file(path / LIGHTNING_META)
    checkpoint = _load_file(path)
    return {k: v for k, v in checkpoint.items() if k not in ("state_dict", "optimizer_states")}


def _sharded_model_state(path: Path) -> dict[str, torch.Tensor]:
    """Only the model entries of a DCP folder, at full size (DCP reshards them onto the plain tensors)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    class SafeReader(dcp.FileSystemReader):  # the metadata pickle through the restricted unpickler
        def read_metadata(self, *args, **kwargs):
            metadata = read_dcp_metadata(path)
            if getattr(metadata, "storage_meta", None) is None:
                from torch.distributed.checkpoint.metadata import StorageMeta

                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

    reader = SafeReader(str(path))
    prefix = "state_dict."
    template = {
        key[len(prefix):]: torch.empty(meta.size, dtype=meta.properties.dtype)
        for key, meta in reader.read_metadata().state_dict_metadata.items()
        if key.startswith(prefix) and isinstance(meta, TensorStorageMetadata)
    }  # fmt: skip
    state = {"state_dict": template}
    with warnings.catch_warnings():  # no_dist=True is the point here; torch warns about it regardless
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(state, storage_reader=reader, no_dist=True)
    return state["state_dict"]


def model_state(path: str | Path, verify: bool = True) -> dict[str, torch.Tensor]:
    """GazeVLM weights (names as in `GazeVLM.state_dict()`) from any of the three kinds of source."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no checkpoint or model directory at {path}")
    if is_model_dir(path):
        from gazelit.models.gaze_vlm import saved_state

        try:
            return saved_state(path)
        except Exception as e:  # safetensors raises its own error types for damaged headers
            raise CheckpointError(f"{path / MODEL_WEIGHTS_FILE}: unreadable ({type(e).__name__}: {e})") from None
    if path.is_dir() and not is_sharded_checkpoint(path):
        raise CheckpointError(f"{path}: neither a Lightning checkpoint (file or sharded folder) nor a model directory")
    if verify:
        checked(path)
    if is_sharded_checkpoint(path):
        state = _sharded_model_state(path)
    else:
        data = _load_file(path)
        bare = any(isinstance(k, str) and k.startswith(MODULE_PREFIX) for k in data)  # a bare module state dict
        state = data.get("state_dict", data if bare else None)
        if not isinstance(state, dict):
            raise CheckpointError(f"{path}: no state_dict: not a Lightning checkpoint")
    return {k[len(MODULE_PREFIX) :]: v for k, v in state.items() if k.startswith(MODULE_PREFIX)}


def checked(path: str | Path) -> Path:
    """`verify_checkpoint`, logging its warning for checkpoints without an integrity record."""
    warning = verify_checkpoint(path)
    if warning:
        log.warning(warning)
    return Path(path)


def _load_file(path: Path) -> dict[str, Any]:
    """torch.load(weights_only=True) of a single-file checkpoint, any failure as one CheckpointError line."""
    try:
        data = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise CheckpointError(f"{path}: not a readable checkpoint ({type(e).__name__}: {first})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: holds a {type(data).__name__}, not a Lightning checkpoint")
    return data


# ---------------------------------------------------------------------------------------------- init_from
@dataclass
class WeightsReport:
    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)  # in the model, not in the source: left as built
    unexpected: list[str] = field(default_factory=list)  # in the source, not in the model: ignored


class WeightMismatchError(ValueError):
    """Parameters present in both the model and the source with different shapes."""


def load_matching_weights(model: nn.Module, source: str | Path) -> WeightsReport:
    """`init_from`: copy every source tensor whose name and shape match the model's. Shape mismatches are
    an error listing them; names only on one side are reported (logged), not an error."""
    state = model_state(source)
    own = model.state_dict()
    mismatched = [
        f"{name}: source {tuple(state[name].shape)}, model {tuple(tensor.shape)}"
        for name, tensor in own.items()
        if name in state and tuple(state[name].shape) != tuple(tensor.shape)
    ]
    if mismatched:
        listing = "\n  ".join(mismatched)
        raise WeightMismatchError(f"init_from {source}: {len(mismatched)} tensor(s) differ in shape:\n  {listing}")
    from gazelit.models.gaze_vlm import tied_parameter_names

    tied = set(tied_parameter_names(model))  # saved once: not missing
    report = WeightsReport(
        loaded=[n for n in own if n in state],
        missing=[n for n in own if n not in state and n not in tied],
        unexpected=[n for n in state if n not in own],
    )
    load_full_state(model, {n: state[n] for n in report.loaded})
    log.info("init_from %s: %d tensors loaded", source, len(report.loaded))
    if report.missing:
        log.warning("init_from %s: %d tensors not in the source keep their initial values: %s",
                    source, len(report.missing), report.missing[:10])  # fmt: skip
    if report.unexpected:
        log.warning("init_from %s: %d source tensors have no place in the model: %s",
                    source, len(report.unexpected), report.unexpected[:10])  # fmt: skip
    return report


def load_full_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load full (unsharded) tensors into a model, sharded by FSDP2 or not (names absent from `state` keep
    their values): each rank keeps its own shard of every tensor."""
    from torch.distributed.tensor import DTensor

    if any(isinstance(t, DTensor) for t in model.state_dict().values()):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True, strict=False))
    else:
        model.load_state_dict(state, strict=False)


# ---------------------------------------------------------------------------------------------- export
def trained_top_k(metadata: dict[str, Any]) -> tuple[bool, int | None]:
    """(found, k): the k the progressive schedule had reached when the checkpoint was written (None: all
    regions); found is False for a run without a schedule."""
    for key, state in (metadata.get("callbacks") or {}).items():
        if str(key).startswith("ProgressiveTopK") and isinstance(state, dict) and "current" in state:
            return True, state["current"]
    return False, None


def export_checkpoint(checkpoint: str | Path, out_dir: str | Path) -> Path:
    """A Lightning checkpoint (file or sharded folder) of GazeVLMModule -> a GazeVLM.save_pretrained
    directory. The model is rebuilt from the checkpoint's hyper-parameters; its k is the k training had
    reached (the schedule's), else the configured one."""
    from gazelit.schema import ModelConfig
    from gazelit.models.gaze_vlm import GazeVLM, load_exact_weights

    if not Path(checkpoint).exists():
        raise CheckpointError(f"{checkpoint}: no such checkpoint")
    checked(checkpoint)
    metadata = checkpoint_metadata(checkpoint)
    hparams = metadata.get("hyper_parameters") or {}
    if "model_config" not in hparams:
        raise ValueError(
            f"{checkpoint}: no model_config in the checkpoint's hyper_parameters; not a GazeVLMModule checkpoint?"
        )
    model = GazeVLM.build(ModelConfig.from_dict(hparams["model_config"]))
    load_exact_weights(model, model_state(checkpoint, verify=False), checkpoint)  # verified above
    found, k = trained_top_k(metadata)
    if found:
        model.top_k = k
    return model.save_pretrained(out_dir)
