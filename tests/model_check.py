"""Judges recorded AWS requests by the service models botocore ships: the oracle for every
request kiln sends, independent of what moto happens to accept (moto drops unknown fields
silently, so a misspelt field would pass a test against moto alone).

Input: a JSON file, a list of requests as the test proxy recorded them
({"method", "path", "headers": {lower-case name: value}, "body_b64"}).
For each request: the operation must be one the model knows; every parameter sent must be a
member of its shape, in the place the protocol puts it (EC2 query names, URI labels, headers,
query string, JSON body); required members must be present; values must have the member's
type, be one of its enum values, and lie within its min/max. Prints one line per violation
and exits 1 if there is any, 0 otherwise.

Run with the moto venv's Python (botocore comes with moto):
    $KILN_CACHE_DIR/moto-venv/bin/python tests/model_check.py requests.json
"""

import base64
import json
import re
import sys
import urllib.parse

import botocore.session

SESSION = botocore.session.get_session()
MODELS = {}


def model(service):
    if service not in MODELS:
        MODELS[service] = SESSION.get_service_model(service)
    return MODELS[service]


class Checker:
    def __init__(self, where):
        self.where = where
        self.problems = []

    def bad(self, path, message):
        self.problems.append(f"{self.where}: {path}: {message}")

    def scalar(self, path, shape, value):
        """A value given as text (query string, header, URI label, EC2 form) or JSON."""
        t = shape.type_name
        if t in ("integer", "long"):
            try:
                n = int(value)
            except (TypeError, ValueError):
                return self.bad(path, f"{value!r} is not an integer ({shape.name})")
            lo, hi = shape.metadata.get("min"), shape.metadata.get("max")
            if lo is not None and n < lo:
                self.bad(path, f"{n} is below the minimum {lo} ({shape.name})")
            if hi is not None and n > hi:
                self.bad(path, f"{n} is above the maximum {hi} ({shape.name})")
        elif t == "boolean":
            if not (isinstance(value, bool) or value in ("true", "false")):
                self.bad(path, f"{value!r} is not a boolean")
        elif t in ("float", "double"):
            try:
                float(value)
            except (TypeError, ValueError):
                self.bad(path, f"{value!r} is not a number")
        elif t == "string":
            if not isinstance(value, str):
                return self.bad(path, f"{value!r} is not a string")
            enum = shape.metadata.get("enum")
            if enum and value not in enum:
                self.bad(path, f"{value!r} is not one of {shape.name}'s values {sorted(enum)}")
            lo, hi = shape.metadata.get("min"), shape.metadata.get("max")
            if lo is not None and len(value) < lo:
                self.bad(path, f"{value!r} is shorter than {lo} ({shape.name})")
            if hi is not None and len(value) > hi:
                self.bad(path, f"{value!r} is longer than {hi} ({shape.name})")
        elif t in ("timestamp", "blob"):
            pass
        else:
            self.bad(path, f"a {t} ({shape.name}) given as a single value")

    def json_value(self, path, shape, value):
        t = shape.type_name
        if t == "structure":
            if not isinstance(value, dict):
                return self.bad(path, f"{shape.name} must be an object")
            for k, v in value.items():
                if k not in shape.members:
                    self.bad(f"{path}.{k}", f"not a member of {shape.name} (members: {', '.join(shape.members)})")
                else:
                    self.json_value(f"{path}.{k}", shape.members[k], v)
            for r in shape.required_members:
                if r not in value:
                    self.bad(path, f"required member {r} of {shape.name} is missing")
        elif t == "list":
            if not isinstance(value, list):
                return self.bad(path, f"{shape.name} must be a list")
            for i, v in enumerate(value):
                self.json_value(f"{path}[{i}]", shape.member, v)
        elif t == "map":
            if not isinstance(value, dict):
                return self.bad(path, f"{shape.name} must be an object")
            for k, v in value.items():
                self.scalar(f"{path} key", shape.key, k)
                self.json_value(f"{path}.{k}", shape.value, v)
        elif t in ("integer", "long") and isinstance(value, bool):
            self.bad(path, f"{value!r} is not an integer")
        elif t in ("integer", "long", "float", "double") and not isinstance(value, (int, float)):
            self.bad(path, f"{value!r} is not a number")
        elif t == "boolean" and not isinstance(value, bool):
            self.bad(path, f"{value!r} is not a boolean")
        else:
            self.scalar(path, shape, value)


def ec2_name(shape, default):
    """The name EC2's query protocol gives a member (botocore's EC2 serializer does the same)."""
    s = shape.serialization
    if "queryName" in s:
        return s["queryName"]
    if "name" in s:
        return s["name"][0].upper() + s["name"][1:]
    return default


def check_ec2(c, form):
    action = form.pop("Action", None)
    form.pop("Version", None)
    try:
        op = model("ec2").operation_model(action)
    except Exception:
        return c.bad("Action", f"{action!r} is not an EC2 operation")
    c.where += f" ec2:{action}"
    # Rebuild the tree of what was sent from the flattened names, then judge it shape by shape.
    tree = {}
    for key, value in form.items():
        node = tree
        parts = key.split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                c.bad(key, "given both as a value and as a structure")
                break
        else:
            node[parts[-1]] = value

    def walk(path, shape, node):
        t = shape.type_name
        if t == "structure":
            if not isinstance(node, dict):
                return c.bad(path, f"{shape.name} given as a single value")
            names = {ec2_name(m, k): (k, m) for k, m in shape.members.items()}
            for k, v in node.items():
                if k not in names:
                    c.bad(f"{path}{k}", f"not a member of {shape.name} (EC2 names: {', '.join(sorted(names))})")
                else:
                    walk(f"{path}{k}.", names[k][1], v)
            present = {names[k][0] for k in node if k in names}
            for r in shape.required_members:
                if r not in present:
                    c.bad(path or "(request)", f"required member {r} of {shape.name} is missing")
        elif t == "list":
            if not isinstance(node, dict) or not all(k.isdigit() for k in node):
                return c.bad(path, f"{shape.name} must be sent as .1, .2, …")
            for k, v in node.items():
                walk(f"{path}{k}.", shape.member, v)
        else:
            if isinstance(node, dict):
                return c.bad(path, f"{shape.name} is a {t}, not a structure")
            c.scalar(path.rstrip("."), shape, node)

    walk("", op.input_shape, tree)


def match_rest(service, method, path, headers):
    """The operation of a REST service whose method and URI template match the request; of
    several (S3's PutObject and CopyObject share one), the most literal template, then the one
    whose required headers are all there."""
    raw_path, _, query = path.partition("?")
    segs = [urllib.parse.unquote(s) for s in raw_path.strip("/").split("/")] if raw_path.strip("/") else []
    query_pairs = urllib.parse.parse_qsl(query, keep_blank_values=True)
    best = None
    for name in model(service).operation_names:
        op = model(service).operation_model(name)
        if op.http.get("method") != method:
            continue
        tpath, _, tquery = op.http["requestUri"].partition("?")
        tsegs = tpath.strip("/").split("/") if tpath.strip("/") else []
        labels = {}
        ok = True
        for i, t in enumerate(tsegs):
            m = re.fullmatch(r"\{(\w+)(\+?)\}", t)
            if m and m.group(2):
                labels[m.group(1)] = "/".join(segs[i:])
                if len(segs) <= i:
                    ok = False
                break
            if i >= len(segs):
                ok = False
                break
            if m:
                labels[m.group(1)] = segs[i]
            elif t != segs[i]:
                ok = False
                break
        else:
            ok = ok and len(segs) == len(tsegs)
        # A literal query in the template (`?uploads`) must be there.
        for q in filter(None, tquery.split("&")):
            if q.split("=")[0] not in dict(query_pairs):
                ok = False
        if ok:
            literal = len([t for t in tsegs if not t.startswith("{")]) + len(tquery)
            shape = op.input_shape
            missing = 0
            if shape is not None:
                for r in shape.required_members:
                    m = shape.members[r]
                    if m.serialization.get("location") == "header":
                        missing += m.serialization.get("name", r).lower() not in headers
            key = (literal, -missing)
            if best is None or key > best[0]:
                best = (key, op, labels, dict(query_pairs), tquery)
    return best


def check_rest(c, service, method, path, headers, body):
    found = match_rest(service, method, path, headers)
    if not found:
        return c.bad(path, f"no {service} operation is {method} {path.split('?')[0]}")
    _, op, labels, query, tquery = found
    c.where += f" {service}:{op.name}"
    shape = op.input_shape
    if shape is None:
        return
    given = set()
    literal_query = {q.split("=")[0] for q in tquery.split("&") if q}
    by_query = {m.serialization.get("name", k): (k, m) for k, m in shape.members.items() if m.serialization.get("location") == "querystring"}
    by_header = {m.serialization.get("name", k).lower(): (k, m) for k, m in shape.members.items() if m.serialization.get("location") == "header"}
    by_label = {m.serialization.get("name", k): (k, m) for k, m in shape.members.items() if m.serialization.get("location") == "uri"}
    for label, value in labels.items():
        if label in by_label:
            k, m = by_label[label]
            given.add(k)
            c.scalar(f"uri {{{label}}}", m, value)
    for q, value in query.items():
        if q in literal_query or q.startswith("x-id"):
            continue
        if q not in by_query:
            c.bad(f"?{q}", f"not a query parameter of {op.name} (known: {', '.join(sorted(by_query))})")
        else:
            k, m = by_query[q]
            given.add(k)
            c.scalar(f"?{q}", m, value)
    # The SDK adds headers of its own (signing, retries, checksums); only members are judged.
    for h, value in headers.items():
        if h in by_header:
            k, m = by_header[h]
            given.add(k)
            c.scalar(f"header {h}", m, value)
    payload = shape.serialization.get("payload")
    body_members = {k: m for k, m in shape.members.items() if "location" not in m.serialization}
    if payload:
        if body:
            given.add(payload)
    elif body_members and body:
        try:
            doc = json.loads(body)
        except ValueError:
            return c.bad("body", "is not JSON")
        if not isinstance(doc, dict):
            return c.bad("body", "is not a JSON object")
        for k, v in doc.items():
            if k not in body_members:
                c.bad(f"body.{k}", f"not a member of {shape.name} (members: {', '.join(body_members)})")
            else:
                given.add(k)
                c.json_value(f"body.{k}", body_members[k], v)
    for r in shape.required_members:
        if r not in given:
            c.bad("(request)", f"required member {r} of {shape.name} is missing")


# The JSON protocols name the service by its target prefix.
TARGET_PREFIXES = {"AmazonSSM": "ssm"}


def check_json_protocol(c, target, body):
    prefix, _, name = target.rpartition(".")
    service = TARGET_PREFIXES.get(prefix)
    if service is None:
        return c.bad("X-Amz-Target", f"{target!r}: a service this check does not know")
    try:
        op = model(service).operation_model(name)
    except Exception:
        return c.bad("X-Amz-Target", f"{name!r} is not a {service} operation")
    c.where += f" {service}:{name}"
    try:
        doc = json.loads(body or b"{}")
    except ValueError:
        return c.bad("body", "is not JSON")
    c.json_value("body", op.input_shape, doc)


def check(i, req):
    c = Checker(f"request {i}")
    body = base64.b64decode(req.get("body_b64", ""))
    headers = {k.lower(): v for k, v in req.get("headers", {}).items()}
    path = req["path"]
    text = body.decode("utf-8", "replace")
    target = headers.get("x-amz-target")
    if target:
        check_json_protocol(c, target, body)
    elif "Action=" in text and headers.get("content-type", "").startswith("application/x-www-form-urlencoded"):
        check_ec2(c, dict(urllib.parse.parse_qsl(text, keep_blank_values=True)))
    elif path.startswith("/snapshots"):
        check_rest(c, "ebs", req["method"], path, headers, body)
    else:
        check_rest(c, "s3", req["method"], path, headers, body if req["method"] != "PUT" else b"")
    return c.problems


def main():
    reqs = json.load(open(sys.argv[1]))
    problems = [p for i, r in enumerate(reqs) for p in check(i, r)]
    for p in problems:
        print(p)
    print(f"{len(reqs)} requests judged by botocore's models, {len(problems)} problem(s)", file=sys.stderr)
    sys.exit(1 if problems else 0)


if __name__ == "__main__":
    main()
