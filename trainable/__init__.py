"""One trial: model building, data, training (imported by the driver, the trials and the report)."""

import logging

# bitsandbytes, imported on a CPU with AVX512-BF16 while the `kernels` package is installed, asks it for a
# faster 4-bit CPU kernel from the Hugging Face hub; `kernels` refuses a repository outside its trust list,
# and bitsandbytes logs that as a warning at each import, so once in every process of a sweep (driver,
# each trial, the report). Nothing a user can act on (trusting remote code is not the sweep's to switch
# on), and bitsandbytes goes on with its own CPU kernel. That one message is dropped, before any module
# imports bitsandbytes; its logger's other warnings still show.
_UNTRUSTED_KERNEL = "Failed to load CPU gemm_4bit_forward from kernels-community"
logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(
    lambda record: not str(record.msg).startswith(_UNTRUSTED_KERNEL)
)
