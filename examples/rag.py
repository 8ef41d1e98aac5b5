"""Retrieval-augmented answers where the retrieved documents are computed once and reused across questions.

ChatBraid renders documents after the system prompt, one block each, in a stable order (`render_documents`), so
questions that retrieve the same documents share that prefix and the engine reads it from its KV cache. Two ways
to pass them, which render the same text:
- `model.invoke(messages, documents=docs)`;
- in an LCEL chain, `render_documents` inside the prompt template's system message (shown here).

    python examples/rag.py
"""
from langchain_core.documents import Document
from langchain_core.prompts import ChatPromptTemplate
from langchain_core.runnables import RunnableLambda, RunnablePassthrough

from braid_langchain import ChatBraid, render_documents

CORPUS = [
    Document("The Eiffel Tower in Paris is 330 metres tall and was finished in 1889.", id="eiffel"),
    Document("The Colosseum in Rome held about 50,000 spectators and opened in 80 AD.", id="colosseum"),
    Document("The Louvre in Paris is the most visited art museum in the world.", id="louvre"),
    Document("The Vatican Museums in Rome display the Sistine Chapel ceiling by Michelangelo.", id="vatican"),
]
QUESTIONS = ["How tall is the Eiffel Tower?", "When did the Colosseum open?", "Which museum is most visited?"]


def retrieve(question: str, k: int = 3) -> list[Document]:
    """A toy retriever: the k documents sharing the most words with the question."""
    words = set(question.lower().strip("?").split())
    return sorted(CORPUS, key=lambda d: -len(words & set(d.page_content.lower().split())))[:k]


prompt = ChatPromptTemplate.from_messages([
    ("system", "You answer questions using only the documents below. Answer in one short sentence.\n\n{documents}"),
    ("human", "{question}"),
])
model = ChatBraid(temperature=0, max_tokens=40)
chain = {"documents": RunnableLambda(retrieve) | render_documents, "question": RunnablePassthrough()} | prompt | model

if __name__ == "__main__":
    for question in QUESTIONS:
        reply = chain.invoke(question)
        usage = reply.usage_metadata
        print(f"> {question}\n{reply.content}\n  [prompt {usage['input_tokens']} tokens, "
              f"cache_read {usage['input_token_details']['cache_read']}]\n")
    # The same documents through the call argument: the whole corpus, reused by every question after the first.
    for question in QUESTIONS:
        reply = model.invoke([("system", "Answer in one short sentence."), ("human", question)], documents=CORPUS)
        print(f"> {question} (all documents)\n  cache_read {reply.usage_metadata['input_token_details']['cache_read']}"
              f" of {reply.usage_metadata['input_tokens']} prompt tokens")
