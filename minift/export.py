"""``minift merge MODEL OUT``: a model folder holding a LoRA adapter (``<output_dir>/model`` of a
``[lora]`` run, or a folder peft wrote) becomes full weights in transformers' layout, the adapter
folded in (W + scaling * B A, trained copies in place of their originals): what
``AutoModelForCausalLM.from_pretrained(OUT)`` and every minift command load without the base.
The tokenizer and run config of the folder come along; ``OUT`` is written atomically."""
from __future__ import annotations

import shutil
from pathlib import Path

from .checkpoint import RUN_CONFIG, write_dir_atomically
from .errors import InputError
from .hub import from_pretrained
from .lora.peft_format import is_adapter_folder
from .tokenizer import has_tokenizer_files, load_tokenizer


def merge_model_folder(source: str | Path, output: str | Path) -> Path:
    """Write ``source``'s base with its adapter merged into the new folder ``output``."""
    source, output = Path(source).expanduser(), Path(output).expanduser()
    if not is_adapter_folder(source):
        what = "holds full weights already" if source.is_dir() else "is not a folder"
        raise InputError(f"minift merge: {source} {what} — give a model folder holding a LoRA adapter "
                         "(adapter_config.json + adapter_model.safetensors)")
    if output.exists():
        raise InputError(f"minift merge: {output} exists — give a new folder for the merged model")
    model = from_pretrained(source)

    def write(directory: Path) -> None:
        model.save_pretrained(directory)
        if has_tokenizer_files(source):
            load_tokenizer(source).save(directory)
        if (source / RUN_CONFIG).exists():
            shutil.copyfile(source / RUN_CONFIG, directory / RUN_CONFIG)

    return write_dir_atomically(output, write)
