"""A streaming agent loop with two tools: the model calls tools, their results go back, until it answers.

Tool calls stream as `tool_call_chunks`; text streams token by token. A model as small as the embedded
SmolLM2-135M seldom decides on its own to call a tool, so the first step sets tool_choice="any": constrained
decoding then makes it emit a valid call to one of the tools. Later steps leave the choice to the model.

    python examples/agent_loop.py
"""
from langchain_core.messages import HumanMessage, SystemMessage
from langchain_core.tools import tool

from braid_langchain import ChatBraid


@tool
def get_weather(city: str) -> str:
    """Get the current weather in a city."""
    return {"paris": "sunny, 24 C", "rome": "cloudy, 19 C"}.get(city.lower(), "unknown")


@tool
def get_population(city: str) -> int:
    """Get the number of inhabitants of a city."""
    return {"paris": 2_100_000, "rome": 2_800_000}.get(city.lower(), 0)


TOOLS = {t.name: t for t in (get_weather, get_population)}


def run(question: str, max_steps: int = 4) -> None:
    model = ChatBraid(temperature=0, max_tokens=64)
    messages = [SystemMessage("You are a helpful assistant. Use the tools when they help."), HumanMessage(question)]
    print(f"> {question}")
    for step in range(max_steps):
        step_model = model.bind_tools(list(TOOLS.values()), tool_choice="any" if step == 0 else "auto")
        reply = None
        for chunk in step_model.stream(messages):
            print(chunk.content, end="", flush=True)
            for call in chunk.tool_call_chunks:
                print(f"[calling {call['name']}({call['args']})]", flush=True)
            reply = chunk if reply is None else reply + chunk
        messages.append(reply)
        if not reply.tool_calls:
            print()
            return
        for call in reply.tool_calls:
            result = TOOLS[call["name"]].invoke(call)  # a ToolMessage carrying the call's id
            print(f"[{call['name']} -> {result.content}]")
            messages.append(result)
    print("\n[stopped after", max_steps, "steps]")


if __name__ == "__main__":
    run("What is the weather in Paris?")
