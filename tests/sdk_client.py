"""Drives the gateway with the official OpenAI Python SDK, as an application would.

    python3 tests/sdk_client.py BASE_URL API_KEY

Prints one JSON object: for each call, the gateway's request id (header
x-bridge-request-id) and what the SDK parsed. Used by tests/tests/clients.rs.
"""

import json
import sys

import openai
from openai import OpenAI

base_url, api_key = sys.argv[1], sys.argv[2]
client = OpenAI(base_url=base_url, api_key=api_key, max_retries=0)
messages = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Say hello."}]
out = {}

raw = client.chat.completions.with_raw_response.create(model="gpt-5-nano", messages=messages)
completion = raw.parse()
out["plain"] = {
    "request_id": raw.headers.get("x-bridge-request-id"),
    "content": completion.choices[0].message.content,
    "usage": completion.usage.model_dump(),
}

with client.chat.completions.with_streaming_response.create(
    model="gpt-5-nano", messages=messages, stream=True
) as resp:
    chunks = list(resp.parse())
    out["stream"] = {
        "request_id": resp.headers.get("x-bridge-request-id"),
        "content": "".join((c.choices[0].delta.content or "") for c in chunks if c.choices),
        "saw_usage": any(c.usage is not None for c in chunks),
    }

tools = [{"type": "function", "function": {
    "name": "read", "description": "Read a file",
    "parameters": {"type": "object", "properties": {"path": {"type": "string"}}, "required": ["path"]}}}]
raw = client.chat.completions.with_raw_response.create(
    model="gpt-5-nano", messages=messages, tools=tools, tool_choice="auto", max_completion_tokens=300)
call = raw.parse().choices[0].message.tool_calls[0]
out["tool"] = {
    "request_id": raw.headers.get("x-bridge-request-id"),
    "name": call.function.name,
    "arguments": json.loads(call.function.arguments),
}

try:
    OpenAI(base_url=base_url, api_key="sk-not-a-real-key-1", max_retries=0).chat.completions.create(
        model="gpt-5-nano", messages=messages)
    out["bad_key"] = "accepted"
except openai.AuthenticationError as e:
    out["bad_key"] = {"status": e.status_code, "code": e.code}

print(json.dumps(out))
