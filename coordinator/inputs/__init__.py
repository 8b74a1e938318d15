"""Problems in: the sources a dataset comes in (`sources`), the rules a record must meet
(`problems`), reference answers as datasets write them (`answers`) and the enqueue of a
source of any size (`intake`)."""
