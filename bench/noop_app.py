"""The no-op floor: a plain Flask endpoint that parses JSON and returns ten floats.

It does what every JSON model endpoint must do at least (parse the body with ``request.get_json()``,
answer with ``jsonify``), with no model, validation, request ids or logging. The benchmark serves it
under the same gunicorn worker settings as the model server and reports every result as a ratio to it.
"""

from flask import Flask, jsonify, request

app = Flask(__name__)
TEN = [0.1] * 10


@app.post("/predict")
def predict():  # type: ignore[no-untyped-def]
    request.get_json()
    return jsonify({"prediction": [TEN]})
