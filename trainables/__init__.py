"""One trial: a backbone, a method, a task, the training loop, and what it measured."""
import logging

# bitsandbytes (imported by peft and transformers when installed) warns at import on CPUs with
# AVX512-BF16 that an optional kernel package is missing; the fallback it uses is correct, and the
# warning would be the first line of every one-line CLI error.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
# DeepSpeed announces on every import without a GPU that it falls back to its CPU accelerator,
# which is what a CPU run wants; its logger keeps filters added before it is configured.
logging.getLogger("DeepSpeed").addFilter(lambda record: not record.getMessage().startswith("Setting accelerator to CPU"))
