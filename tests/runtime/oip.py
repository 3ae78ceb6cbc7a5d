"""Queries through Open Inference Protocol clients nobody here wrote (tritonclient HTTP and
gRPC, KServe's REST client), shared by the `sealtorch serve` and KServe predictor tests."""

from __future__ import annotations

import numpy as np
import torch


def triton_http(url: str, model: str, x: torch.Tensor, *, binary: bool,
                input_name: str = "input", output_name: str = "output") -> torch.Tensor:
    """One ResNet request through tritonclient.http; ``binary`` both ways, or JSON both ways."""
    import tritonclient.http as th

    host = url.removeprefix("http://")
    with th.InferenceServerClient(host, network_timeout=300, connection_timeout=60) as c:
        inp = th.InferInput(input_name, list(x.shape), "FP32")
        inp.set_data_from_numpy(x.numpy(), binary_data=binary)
        out = th.InferRequestedOutput(output_name, binary_data=binary)
        res = c.infer(model, [inp], outputs=[out])
        return torch.from_numpy(np.array(res.as_numpy(output_name)))


def triton_http_default(url: str, model: str, x: torch.Tensor,
                        input_name: str = "input", output_name: str = "output"
                        ) -> torch.Tensor:
    """tritonclient's defaults: binary input, no requested outputs (all come back binary)."""
    import tritonclient.http as th

    with th.InferenceServerClient(url.removeprefix("http://"), network_timeout=300) as c:
        inp = th.InferInput(input_name, list(x.shape), "FP32")
        inp.set_data_from_numpy(x.numpy())
        res = c.infer(model, [inp])
        return torch.from_numpy(np.array(res.as_numpy(output_name)))
