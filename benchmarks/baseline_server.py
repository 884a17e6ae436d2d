"""The naive many-model server a user would otherwise write (the reference's design): FastAPI,
one TorchScript module per model loaded at start, one request per forward, no batching.

    python benchmarks/baseline_server.py --store URI --models a,b,c --port 9000

It reads the same artifacts as Myriad's server (model.ts, tokenizer.json) so both answer the
same models from the same store; only the serving design differs.
"""

import argparse
import sys
from pathlib import Path

# At module level, not in build_app: FastAPI resolves the handlers' annotations here.
from fastapi import FastAPI, HTTPException, Request

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def build_app(store_uri: str, model_ids: list[str]):
    import torch

    from serving.backends.contract import open_artifact
    from serving.build.modeling import encode
    from serving.store import artifact_prefix, open_store

    torch.set_num_threads(1)
    store = open_store(store_uri)
    models = {}
    for model_id in model_ids:
        artifact = open_artifact(store, artifact_prefix(model_id, "cpu"), None)
        module = torch.jit.load(str(artifact.directory / "model.ts"))
        # TorchScript's profiling executor optimises over the first two calls; warm up as
        # Myriad's server does, so the comparison is of steady state.
        ids, mask = encode(artifact.tokenizer, ["warm-up"])
        with torch.inference_mode():
            for _ in range(2):
                module(ids, mask)
        models[model_id] = (module, artifact.tokenizer)
    app = FastAPI()

    @app.post("/predictions/{model_id}")
    async def predict(model_id: str, request: Request) -> dict:
        if model_id not in models:
            raise HTTPException(404, f"model {model_id} not found")
        body = await request.json()
        module, tokenizer = models[model_id]
        # One text needs no padding: a naive server tokenises it as it is (trim_to=1 cuts the
        # artifact tokenizer's padding to max_length off again).
        ids, mask = encode(tokenizer, [body["text"]], trim_to=1)
        with torch.inference_mode():
            logits = module(ids, mask)[0]
        probabilities = logits.softmax(-1)
        best = int(probabilities.argmax())
        return {"label": f"LABEL_{best}", "score": float(probabilities[best])}

    @app.get("/v2/health/ready")
    def ready() -> dict:
        return {"ready": True}

    return app


def main() -> None:
    import uvicorn

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", required=True)
    parser.add_argument("--models", required=True)
    parser.add_argument("--port", type=int, default=9000)
    args = parser.parse_args()
    app = build_app(args.store, args.models.split(","))
    uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
