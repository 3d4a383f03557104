"""Let accelerate apply FSDP2 on the CPU, so that tests run `Trainer`'s FSDP path over gloo.

accelerate turns a data-parallel world into an FSDP one only on accelerators: on a CPU world (`MULTI_CPU`) it drops
the FSDP plugin and `Trainer` trains with DDP. torch's `fully_shard` itself runs on CPU tensors over gloo, so after
accelerate has built its state we set the distributed type it would have set on GPUs. Everything else (preparing the
model with `fully_shard`, sharded optimizer state, checkpoints through `torch.distributed.checkpoint`, gathering a
whole state dict) is accelerate's and Trainer's own code. Import this module before the `Trainer` is built.
"""

from accelerate.state import AcceleratorState, PartialState
from accelerate.utils import DistributedType

_build_state = AcceleratorState.__init__


def _state_that_shards_on_cpu(self, *args, fsdp_plugin=None, **kwargs):
    _build_state(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
    if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
        self.distributed_type = DistributedType.FSDP
        self.fsdp_plugin = fsdp_plugin
        PartialState._shared_state["distributed_type"] = DistributedType.FSDP


AcceleratorState.__init__ = _state_that_shards_on_cpu
