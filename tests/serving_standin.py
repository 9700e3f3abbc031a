"""A stand-in for tensorflow_model_server: TF Serving's documented request mapping over a SavedModel.

No TF Serving server can be installed here, but its client protocol can: the
``tensorflow-serving-api`` wheel (``pip install --no-deps``) holds the gRPC
stubs and protos. The stand-in applies TF Serving's documented mapping
(https://www.tensorflow.org/tfx/serving/api_rest) to the SavedModel: the
signature is looked up by ``signature_name`` (default ``serving_default``),
inputs by their alias, ``{"b64": ...}`` values are base64-decoded; the row
format (``instances``) answers ``predictions``, the columnar one (``inputs``)
answers ``outputs``. REST requests travel over HTTP and gRPC ones over a gRPC
channel, as they would against ``tensorflow_model_server``. Used by
tests/test_serving_requests.py and by the serving guide's examples (tests/markdown_examples.py).
"""

import base64
import contextlib
import json
import os
import threading
from concurrent import futures
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import grpc
import tensorflow as tf
from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc

MODEL_NAME = "fcn"


# --- the stand-in: TF Serving's documented request mapping ------------------------------------------


class StandIn:
    """The part of tensorflow_model_server a client sees: signatures by name, inputs by alias, b64 strings."""

    def __init__(self, saved_model_dir):
        self.loaded = tf.saved_model.load(saved_model_dir)

    def signature(self, name):
        name = name or "serving_default"
        if name not in self.loaded.signatures:
            raise KeyError(f"Serving signature name: \"{name}\" not found in signature def")
        return self.loaded.signatures[name]

    def run(self, signature_name, inputs: dict) -> dict:
        function = self.signature(signature_name)
        specs = function.structured_input_signature[1]
        if set(inputs) != set(specs):
            raise KeyError(f"inputs {sorted(inputs)} do not match the signature's {sorted(specs)}")
        tensors = {alias: tf.constant(value, dtype=specs[alias].dtype) for alias, value in inputs.items()}
        return {alias: tensor.numpy() for alias, tensor in function(**tensors).items()}

    def rest_predict(self, body: dict) -> dict:
        """``POST /v1/models/<name>:predict`` with a JSON body."""
        function = self.signature(body.get("signature_name"))
        aliases = list(function.structured_input_signature[1])
        if "instances" in body:  # row format: one entry per batch element
            rows = [_decode_b64(row) for row in body["instances"]]
            if isinstance(rows[0], dict):
                inputs = {alias: [row[alias] for row in rows] for alias in rows[0]}
            else:
                (alias,) = aliases
                inputs = {alias: rows}
            outputs = self.run(body.get("signature_name"), inputs)
            if len(outputs) == 1:
                (value,) = outputs.values()
                return {"predictions": value.tolist()}
            size = len(next(iter(outputs.values())))
            rows = [{alias: value[i].tolist() for alias, value in outputs.items()} for i in range(size)]
            return {"predictions": rows}
        columns = _decode_b64(body["inputs"])
        if not isinstance(columns, dict):
            (alias,) = aliases
            columns = {alias: columns}
        outputs = self.run(body.get("signature_name"), columns)
        if len(outputs) == 1:
            (value,) = outputs.values()
            return {"outputs": value.tolist()}
        return {"outputs": {alias: value.tolist() for alias, value in outputs.items()}}

    def grpc_predict(self, request: predict_pb2.PredictRequest) -> predict_pb2.PredictResponse:
        inputs = {alias: tf.make_ndarray(proto) for alias, proto in request.inputs.items()}
        outputs = self.run(request.model_spec.signature_name, inputs)
        response = predict_pb2.PredictResponse()
        response.model_spec.CopyFrom(request.model_spec)
        for alias, value in outputs.items():
            response.outputs[alias].CopyFrom(tf.make_tensor_proto(value))
        return response


def _decode_b64(value):
    if isinstance(value, dict):
        if set(value) == {"b64"}:
            return base64.b64decode(value["b64"])
        return {key: _decode_b64(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_decode_b64(item) for item in value]
    return value


class _Servicer(prediction_service_pb2_grpc.PredictionServiceServicer):
    def __init__(self, stand_in):
        self.stand_in = stand_in

    def Predict(self, request, context):  # noqa: N802  (the gRPC method's name)
        try:
            return self.stand_in().grpc_predict(request)
        except (KeyError, tf.errors.InvalidArgumentError) as error:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(error))


def _rest_handler(stand_in):
    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802
            if self.path != f"/v1/models/{MODEL_NAME}:predict":
                return self._reply(404, {"error": f"no model at {self.path}"})
            try:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                return self._reply(200, stand_in().rest_predict(body))
            except (KeyError, tf.errors.InvalidArgumentError) as error:
                return self._reply(400, {"error": str(error)})

        def _reply(self, status, payload):
            data = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args):
            pass

    return Handler


@contextlib.contextmanager
def serving(stand_in, rest_port: int = 0, grpc_port: int = 0):
    """REST and gRPC servers on localhost answering from ``stand_in()``; yields (REST predict URL, gRPC target)."""
    http = ThreadingHTTPServer(("127.0.0.1", rest_port), _rest_handler(stand_in))
    threading.Thread(target=http.serve_forever, daemon=True).start()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    prediction_service_pb2_grpc.add_PredictionServiceServicer_to_server(_Servicer(stand_in), server)
    port = server.add_insecure_port(f"127.0.0.1:{grpc_port}")
    server.start()
    try:
        yield f"http://127.0.0.1:{http.server_address[1]}/v1/models/{MODEL_NAME}:predict", f"127.0.0.1:{port}"
    finally:
        server.stop(None)
        http.shutdown()
        http.server_close()


@contextlib.contextmanager
def serve_model_base_path(base_path: str, rest_port: int = 8501, grpc_port: int = 8500):
    """As ``tensorflow_model_server --model_base_path``: each request is answered by the newest version folder."""
    loaded = {}

    def newest():
        versions = [int(name) for name in os.listdir(base_path) if name.isdigit()] if os.path.isdir(base_path) else []
        if not versions:
            raise KeyError(f"no version of the model under {base_path}")
        path = os.path.join(base_path, str(max(versions)))
        if path not in loaded:
            loaded[path] = StandIn(path)
        return loaded[path]

    with serving(newest, rest_port, grpc_port) as addresses:
        yield addresses
