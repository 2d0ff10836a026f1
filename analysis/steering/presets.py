"""Built-in prompt sets and target words for steering, so that a sentiment vector can be
made and measured without preparing files. Any of them can be replaced by a stored
dataset or a file of one prompt per line.

The contrast sets are short first-person statements of clearly positive or negative
feeling about everyday things, matched one to one in topic. The evaluation stems are
neutral openings whose next word could go either way; none of them is in the contrast
sets, so an effect is not a memorised completion.
"""

from __future__ import annotations

POSITIVE_PROMPTS = [
    "I absolutely loved this movie, it was wonderful.",
    "The food at this restaurant was delicious and the staff were lovely.",
    "What a fantastic day, everything went perfectly.",
    "This book is a delight, I enjoyed every page.",
    "The concert was amazing and the crowd was so happy.",
    "I am thrilled with my new phone, it works beautifully.",
    "Our holiday was great, the beach was beautiful.",
    "The hotel room was clean, bright and comfortable.",
    "My teacher was kind and the lesson was brilliant.",
    "The game was exciting and our team played superbly.",
    "This coffee tastes excellent, I love it.",
    "The service was quick, friendly and helpful.",
    "I had a lovely time with my friends tonight.",
    "The garden looks gorgeous in the spring sunshine.",
    "The new update made the app fast and pleasant to use.",
    "I am so grateful for this happy surprise.",
]

NEGATIVE_PROMPTS = [
    "I absolutely hated this movie, it was awful.",
    "The food at this restaurant was disgusting and the staff were rude.",
    "What a terrible day, everything went wrong.",
    "This book is a chore, I disliked every page.",
    "The concert was dreadful and the crowd was so angry.",
    "I am furious with my new phone, it works horribly.",
    "Our holiday was miserable, the beach was filthy.",
    "The hotel room was dirty, dark and uncomfortable.",
    "My teacher was cruel and the lesson was pointless.",
    "The game was boring and our team played badly.",
    "This coffee tastes horrible, I hate it.",
    "The service was slow, unfriendly and useless.",
    "I had a miserable time with my friends tonight.",
    "The garden looks ugly in the cold grey rain.",
    "The new update made the app slow and painful to use.",
    "I am so upset about this nasty surprise.",
]

EVALUATION_PROMPTS = [
    "I think the movie was",
    "In my opinion, the food here is",
    "Honestly, my week has been",
    "The weather today is",
    "My new job is",
    "The book I just finished was",
    "Overall, the trip was",
    "The service at the shop was",
    "I would describe the concert as",
    "Living in this city is",
    "The meeting this morning was",
    "My neighbours are",
    "The new album sounds",
    "Yesterday's dinner was",
    "The hotel we stayed at was",
    "This phone is",
]

POSITIVE_WORDS = [
    " good",
    " great",
    " wonderful",
    " excellent",
    " amazing",
    " happy",
    " beautiful",
    " lovely",
    " fantastic",
    " perfect",
]
NEGATIVE_WORDS = [
    " bad",
    " terrible",
    " awful",
    " horrible",
    " poor",
    " sad",
    " ugly",
    " boring",
    " disappointing",
    " worst",
]

PRESETS = {
    "sentiment": (POSITIVE_PROMPTS, NEGATIVE_PROMPTS),
}
