# The committed demo model (docs/DEMO_MODEL.md): its files are the ones recorded in
# models/demo-brown/SHA256SUMS, and `dsv4 serve` with no --model answers a chat request with it.
find_program(DSV4_SHA256SUM sha256sum)
if(DSV4_SHA256SUM)
  add_test(NAME demo.sha256 COMMAND ${DSV4_SHA256SUM} --check --strict SHA256SUMS
           WORKING_DIRECTORY ${PROJECT_SOURCE_DIR}/models/demo-brown)
  set_tests_properties(demo.sha256 PROPERTIES LABELS "unit")
else()
  message(WARNING "sha256sum not found: demo.sha256 is not registered")
endif()
find_program(DSV4_NODE node)
if(DSV4_NODE)
  add_test(NAME demo.chat COMMAND ${DSV4_NODE} --test ${CMAKE_CURRENT_LIST_DIR}/demo_chat.test.mjs
           WORKING_DIRECTORY ${PROJECT_SOURCE_DIR})
  set_tests_properties(demo.chat PROPERTIES LABELS "server" TIMEOUT 600
                       ENVIRONMENT "DSV4_BINARY=$<TARGET_FILE:dsv4>;OMP_WAIT_POLICY=PASSIVE")
else()
  message(WARNING "node not found: demo.chat is not registered")
endif()
