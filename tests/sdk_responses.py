"""Drives the gateway's Responses and embeddings APIs with the official OpenAI Python SDK.

    python3 tests/sdk_responses.py BASE_URL API_KEY

Prints one JSON object: for each call, the gateway's request id (header
x-bridge-request-id) and what the SDK parsed. Used by tests/tests/clients.rs.
"""

import json
import sys

from openai import OpenAI

base_url, api_key = sys.argv[1], sys.argv[2]
client = OpenAI(base_url=base_url, api_key=api_key, max_retries=0)
out = {}

raw = client.responses.with_raw_response.create(model="gpt-5-nano", instructions="Be terse.", input="Say hello.")
response = raw.parse()
out["plain"] = {
    "request_id": raw.headers.get("x-bridge-request-id"),
    "text": response.output_text,
    "usage": response.usage.model_dump(),
}

# Read back at once, and continued, by the key that made it (the gateway knows
# it is theirs before the request has settled).
retrieved = client.responses.retrieve(response.id)
raw = client.responses.with_raw_response.create(model="gpt-5-nano", input="Again.", previous_response_id=response.id)
out["retrieved"] = {"made": response.id, "id": retrieved.id, "continued": raw.headers.get("x-bridge-request-id"),
                    "continued_usage": raw.parse().usage.model_dump()}

tools = [{"type": "function", "name": "read", "description": "Read a file",
          "parameters": {"type": "object", "properties": {"path": {"type": "string"}}, "required": ["path"]}}]
raw = client.responses.with_raw_response.create(model="gpt-5-nano", input="Read hello.txt.", tools=tools)
call = next(item for item in raw.parse().output if item.type == "function_call")
out["tool"] = {"request_id": raw.headers.get("x-bridge-request-id"), "name": call.name,
               "arguments": json.loads(call.arguments)}

# The call's output goes back, streamed: the SDK's own event types.
follow_up = [
    {"role": "user", "content": "Read hello.txt."},
    {"type": "function_call", "call_id": call.call_id, "name": call.name, "arguments": call.arguments},
    {"type": "function_call_output", "call_id": call.call_id, "output": "the file says 42"},
]
with client.responses.with_streaming_response.create(
    model="gpt-5-nano", input=follow_up, tools=tools, stream=True
) as resp:
    events = list(resp.parse())
    done = [e for e in events if e.type == "response.completed"]
    out["stream"] = {
        "request_id": resp.headers.get("x-bridge-request-id"),
        "text": "".join(e.delta for e in events if e.type == "response.output_text.delta"),
        "usage": done[-1].response.usage.model_dump() if done else None,
    }

raw = client.embeddings.with_raw_response.create(model="gpt-5-nano", input=["first text", "second text"])
embeddings = raw.parse()
out["embeddings"] = {
    "request_id": raw.headers.get("x-bridge-request-id"),
    "vectors": len(embeddings.data),
    "dimensions": len(embeddings.data[0].embedding),
    "usage": {"input_tokens": embeddings.usage.prompt_tokens, "output_tokens": 0},
}

print(json.dumps(out))
