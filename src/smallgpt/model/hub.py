"""The Hugging Face hub's GPT-2 models by name, and their download: nothing of the conversion code,
so checking an `init_from` name (config validation) stays cheap."""

from __future__ import annotations

from pathlib import Path

from smallgpt.data.sources import hub_download
from smallgpt.errors import UserError

HUB_MODELS = {name: f"openai-community/{name}" for name in ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl")}
HF_WEIGHTS = "model.safetensors"


def download(repo_id: str) -> Path:
    """The hub snapshot of config.json and model.safetensors (cached; shows download progress)."""
    try:
        from huggingface_hub import hf_hub_url, snapshot_download
    except ImportError:
        raise UserError("downloading from the Hugging Face hub needs: pip install 'smallgpt[hf]'") from None
    return hub_download(
        lambda **options: snapshot_download(repo_id, allow_patterns=["config.json", HF_WEIGHTS], **options),
        hf_hub_url(repo_id, "config.json"),
        lambda reason: UserError(
            f"cannot download {repo_id} from the Hugging Face hub ({reason}); offline, pass a local "
            "folder with its config.json and model.safetensors instead"
        ),
    )
