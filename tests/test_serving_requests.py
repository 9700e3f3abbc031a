"""TF Serving's client request formats, run against the exported SavedModel through a minimal stand-in.

No TF Serving server can be installed here, but its client protocol can: the
``tensorflow-serving-api`` wheel (``pip install --no-deps``) holds the gRPC
stubs and protos. The stand-in below applies TF Serving's documented mapping
(https://www.tensorflow.org/tfx/serving/api_rest) to the SavedModel: the
signature is looked up by ``signature_name`` (default ``serving_default``),
inputs by their alias, ``{"b64": ...}`` values are base64-decoded; the row
format (``instances``) answers ``predictions``, the columnar one (``inputs``)
answers ``outputs``. REST requests travel over HTTP and gRPC ones over a gRPC
channel, as they would against ``tensorflow_model_server``; the answers are
compared with the Keras model.
"""

import base64
import io
import json
import threading
import urllib.error
import urllib.request
from concurrent import futures
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import grpc
import keras
import numpy as np
import pytest
import tensorflow as tf
from models import small_flatten_cnn
from PIL import Image

import keras_fcn_surgery as kfs

# Hand-installed (`pip install --no-deps tensorflow-serving-api`, as .ci/run does): without it these tests are
# skipped, and the rest of the suite still collects.
_NOT_INSTALLED = "needs `pip install --no-deps tensorflow-serving-api==2.21.0` (see pyproject's test extra)"
predict_pb2 = pytest.importorskip("tensorflow_serving.apis.predict_pb2", reason=_NOT_INSTALLED)
prediction_service_pb2_grpc = pytest.importorskip(
    "tensorflow_serving.apis.prediction_service_pb2_grpc", reason=_NOT_INSTALLED
)

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
            return self.stand_in.grpc_predict(request)
        except (KeyError, tf.errors.InvalidArgumentError) as error:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(error))


def _rest_handler(stand_in):
    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802
            if self.path != f"/v1/models/{MODEL_NAME}:predict":
                return self._reply(404, {"error": f"no model at {self.path}"})
            try:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                return self._reply(200, stand_in.rest_predict(body))
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


# --- fixtures: one export with --preprocess caffe, served over HTTP and gRPC ---------------------------


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    source = small_flatten_cnn(softmax=False)  # logits: a softmax saturated by unscaled pixels would hide errors
    fcn = kfs.convert(source)
    result = kfs.export_savedmodel(fcn, tmp_path_factory.mktemp("serving"), preprocess="caffe", input_size=(32, 32))
    stand_in = StandIn(result.path)
    http = ThreadingHTTPServer(("127.0.0.1", 0), _rest_handler(stand_in))
    threading.Thread(target=http.serve_forever, daemon=True).start()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    prediction_service_pb2_grpc.add_PredictionServiceServicer_to_server(_Servicer(stand_in), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    yield fcn, f"http://127.0.0.1:{http.server_address[1]}/v1/models/{MODEL_NAME}:predict", channel
    channel.close()
    server.stop(None)
    http.shutdown()


def post(url, body: dict):
    """What ``curl -d @body.json URL`` sends."""
    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def caffe(pixels):
    return keras.applications.imagenet_utils.preprocess_input(np.asarray(pixels, "float32").copy(), mode="caffe")


def keras_scores(fcn, images):
    return np.asarray(fcn(np.asarray(images, "float32")))


def png(pixels) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


PIXELS = np.random.default_rng(11).integers(0, 256, (2, 40, 44, 3), dtype=np.uint8)


# --- REST -------------------------------------------------------------------------------------------


def test_rest_row_format_serving_default_takes_model_ready_tensors(served):
    fcn, url, _ = served
    ready = caffe(PIXELS)
    status, answer = post(url, {"signature_name": "serving_default", "instances": ready.tolist()})
    assert status == 200
    scores = np.asarray(answer["predictions"])
    assert scores.shape == (2, 3, 4, 5)  # (N, map_height, map_width, classes)
    np.testing.assert_allclose(scores, keras_scores(fcn, ready), rtol=1e-4, atol=1e-6)
    # The mistake the issue describes: raw pixels sent to serving_default give other (wrong) scores.
    _, raw = post(url, {"instances": PIXELS.tolist()})
    assert np.abs(np.asarray(raw["predictions"]) - scores).max() > 0.1 * np.abs(scores).max()


def test_rest_columnar_serving_pixels_applies_the_preprocessing(served):
    fcn, url, _ = served
    status, answer = post(url, {"signature_name": "serving_pixels", "inputs": {"pixels": PIXELS.tolist()}})
    assert status == 200
    scores = np.asarray(answer["outputs"])
    np.testing.assert_allclose(scores, keras_scores(fcn, caffe(PIXELS)), rtol=1e-4, atol=1e-6)
    # Columnar with the bare value (one input) and row format agree.
    _, bare = post(url, {"signature_name": "serving_pixels", "inputs": PIXELS.tolist()})
    _, rows = post(url, {"signature_name": "serving_pixels", "instances": [{"pixels": p.tolist()} for p in PIXELS]})
    np.testing.assert_allclose(np.asarray(bare["outputs"]), scores, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(rows["predictions"]), scores, rtol=1e-6)


def test_rest_b64_images_to_serving_bytes_in_both_formats(served):
    fcn, url, _ = served
    encoded = [{"b64": base64.b64encode(png(image)).decode()} for image in PIXELS]
    want = keras_scores(fcn, caffe(PIXELS))
    status, rows = post(url, {"signature_name": "serving_bytes", "instances": encoded})
    assert status == 200
    np.testing.assert_allclose(np.asarray(rows["predictions"]), want, rtol=1e-4, atol=1e-6)
    _, columns = post(url, {"signature_name": "serving_bytes", "inputs": {"image_bytes": encoded}})
    np.testing.assert_allclose(np.asarray(columns["outputs"]), want, rtol=1e-4, atol=1e-6)


def test_rest_errors_name_the_signature_or_input(served):
    _, url, _ = served
    status, answer = post(url, {"signature_name": "serving_jpeg", "instances": [[[[0.0, 0.0, 0.0]]]]})
    assert status == 400 and "serving_jpeg" in answer["error"]
    status, answer = post(url, {"signature_name": "serving_pixels", "inputs": {"images": PIXELS.tolist()}})
    assert status == 400 and "pixels" in answer["error"]


# --- gRPC -------------------------------------------------------------------------------------------


def grpc_request(signature_name, alias, value) -> predict_pb2.PredictRequest:
    request = predict_pb2.PredictRequest()
    request.model_spec.name = MODEL_NAME
    request.model_spec.signature_name = signature_name
    request.inputs[alias].CopyFrom(tf.make_tensor_proto(value))
    return request


def test_grpc_predict_with_tensor_protos_for_every_signature(served):
    fcn, _, channel = served
    stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
    want = keras_scores(fcn, caffe(PIXELS))
    requests = {
        "serving_default": grpc_request("serving_default", "images", caffe(PIXELS)),
        "serving_pixels": grpc_request("serving_pixels", "pixels", PIXELS.astype(np.float32)),
        "serving_bytes": grpc_request("serving_bytes", "image_bytes", [png(image) for image in PIXELS]),
    }
    for name, request in requests.items():
        response = stub.Predict(request, timeout=60)
        scores = tf.make_ndarray(response.outputs["scores"])
        assert scores.shape == (2, 3, 4, 5), name
        np.testing.assert_allclose(scores, want, rtol=1e-4, atol=1e-6, err_msg=name)


def test_grpc_wrong_dtype_is_refused_like_tf_serving(served):
    _, _, channel = served
    stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
    with pytest.raises(grpc.RpcError) as raised:
        stub.Predict(grpc_request("serving_pixels", "image_bytes", [b"x"]), timeout=60)
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
