"""TF Serving's client request formats, run against the exported SavedModel through a minimal stand-in.

The stand-in (tests/serving_standin.py) applies TF Serving's documented request mapping to the SavedModel;
REST requests travel over HTTP and gRPC ones over a gRPC channel, as they would against
``tensorflow_model_server``; the answers are compared with the Keras model.
"""

import base64
import io
import json
import urllib.error
import urllib.request

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

from serving_standin import MODEL_NAME, StandIn, serving  # noqa: E402

# --- fixtures: one export with --preprocess caffe, served over HTTP and gRPC ---------------------------


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    source = small_flatten_cnn(softmax=False)  # logits: a softmax saturated by unscaled pixels would hide errors
    fcn = kfs.convert(source)
    result = kfs.export_savedmodel(
        fcn, tmp_path_factory.mktemp("serving"), preprocess="caffe", options=kfs.ExportOptions(input_size=(32, 32))
    )
    stand_in = StandIn(result.path)
    with serving(lambda: stand_in) as (url, target):
        channel = grpc.insecure_channel(target)
        yield fcn, url, channel
        channel.close()


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
