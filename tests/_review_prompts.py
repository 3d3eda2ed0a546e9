"""Three toy-review prompts with corrupt twins of equal token length, answer " bad" and foil
" good": the prompt set both no-false-pass test files build their specs on."""

PROMPTS = """\
  - text: "This movie was really good. The acting was"
    corrupt: "This film was really bad. The story was"
    answer: " bad"
    foil: " good"
  - text: "The plot was fun and the story"
    corrupt: "The plot was boring and the film"
    answer: " bad"
    foil: " good"
  - text: "This film was very"
    corrupt: "This movie was very"
    answer: " bad"
    foil: " good"
"""
