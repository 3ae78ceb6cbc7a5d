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


_GRPC_QUERY = """
import io, sys
import numpy as np
import tritonclient.grpc as tg
target, model, input_name, output_name = sys.argv[1:5]
x = np.load(io.BytesIO(sys.stdin.buffer.read()))
with tg.InferenceServerClient(target) as c:
    inp = tg.InferInput(input_name, list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    res = c.infer(model, [inp], client_timeout=300)
buf = io.BytesIO()
np.save(buf, res.as_numpy(output_name))
sys.stdout.buffer.write(buf.getvalue())
"""


def triton_grpc(target: str, model: str, x: torch.Tensor, *, input_name: str = "input",
                output_name: str = "output") -> torch.Tensor:
    """One request through tritonclient.grpc (raw tensor contents both ways), in a process of
    its own: its protobuf definitions clash with kserve's (both are package 'inference')."""
    import io
    import subprocess
    import sys

    buf = io.BytesIO()
    np.save(buf, x.numpy())
    p = subprocess.run([sys.executable, "-c", _GRPC_QUERY, target, model, input_name,
                        output_name], input=buf.getvalue(), capture_output=True, timeout=300,
                       check=False)
    assert p.returncode == 0, p.stderr.decode(errors="replace")[-3000:]
    return torch.from_numpy(np.load(io.BytesIO(p.stdout)))


def kserve_rest(url: str, model: str, x: torch.Tensor, *, binary: bool,
                input_name: str = "input", output_name: str = "output") -> torch.Tensor:
    """One request through KServe's own REST client (``kserve.InferenceRESTClient``, v2)."""
    import asyncio

    from kserve import InferenceRESTClient, InferInput, InferRequest, RESTConfig

    async def run() -> np.ndarray:
        client = InferenceRESTClient(RESTConfig(protocol="v2", timeout=300, retries=0))
        try:
            inp = InferInput(input_name, list(x.shape), "FP32")
            inp.set_data_from_numpy(x.numpy(), binary_data=binary)
            req = InferRequest(model_name=model, infer_inputs=[inp],
                               parameters={"binary_data_output": binary})
            res = await client.infer(url, req, model_name=model)
            out = res.get_output_by_name(output_name)
            assert out is not None
            return out.as_numpy()
        finally:
            await client.close()

    return torch.from_numpy(np.array(asyncio.run(run())))
