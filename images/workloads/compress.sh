# gzip and gunzip generated text, over and over.
seq 1 400000 | awk '{ print $1, $1 % 97, "line of text for the compressor", $1 * 31 }' > /tmp/plain.txt
while true; do
    gzip -c /tmp/plain.txt > /tmp/plain.gz
    gunzip -c /tmp/plain.gz > /tmp/roundtrip.txt
    cmp /tmp/plain.txt /tmp/roundtrip.txt
done
