"""The OpenAI Python SDK against `plait serve`: streamed and plain chat completions, a
streamed Responses call, and the model list. Prints one JSON object for the Rust test."""

import json
import sys

from openai import OpenAI


def main() -> None:
    base = sys.argv[1]
    client = OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0, timeout=300)
    messages = [{"role": "user", "content": "Write a Python function that adds two numbers."}]
    out = {}

    text, usage = "", None
    stream = client.chat.completions.create(
        model="anything", messages=messages, max_tokens=24, temperature=0,
        stream=True, stream_options={"include_usage": True},
    )
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            text += chunk.choices[0].delta.content
        if chunk.usage:
            usage = chunk.usage
    out["chat_streamed"] = text
    out["chat_usage"] = usage.model_dump()

    plain = client.chat.completions.create(
        model="anything", messages=messages, max_tokens=24, temperature=0,
    )
    out["chat_plain"] = plain.choices[0].message.content
    out["chat_finish_reason"] = plain.choices[0].finish_reason

    with client.responses.stream(
        model="anything", instructions="Be brief.", input="Name a prime number.",
        max_output_tokens=16, temperature=0,
    ) as responses:
        kinds = [event.type for event in responses]
        final = responses.get_final_response()
    out["responses_events"] = kinds
    out["responses_text"] = final.output_text
    out["responses_usage"] = final.usage.model_dump()

    out["models"] = [m.id for m in client.models.list().data]
    print(json.dumps(out))


if __name__ == "__main__":
    main()
